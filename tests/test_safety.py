"""Optional Paint components, each a tiny random real model saved to a temporary folder and loaded back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.paint import PaintModel, SamplingConfig, candidate_seed
from viscpm.safety import ClipReranker, ImageSafetyChecker, PromptSafetyChecker

transformers = pytest.importorskip("transformers")

FAST = SamplingConfig(num_inference_steps=2, height=32, width=32)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "dog", "the", "red",
         "sky", "a", "猫", "狗", "海", "边"]
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _bert_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    try:
        return transformers.BertTokenizer(vocab=vocab)  # transformers >= 5
    except TypeError:  # pragma: no cover - transformers 4.x takes a vocab file
        import tempfile

        path = Path(tempfile.mkdtemp()) / "vocab.txt"
        path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
        return transformers.BertTokenizer(vocab_file=str(path))


def _image(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---- prompt checker ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompt_checker")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), max_position_embeddings=64, num_labels=2, **SMALL)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(folder)
    _bert_tokenizer().save_pretrained(folder)
    return folder


def _set_unsafe_probability(checker: PromptSafetyChecker, p: float) -> None:
    """Make the classifier output a constant P(label 1) = p whatever the text."""
    with torch.no_grad():
        checker.model.classifier.weight.zero_()
        checker.model.classifier.bias.copy_(torch.tensor([0.0, float(np.log(p / (1 - p)))]))


def test_prompt_checker_threshold(prompt_folder):
    checker = PromptSafetyChecker.from_folder(prompt_folder)
    texts = ["a red cat", "猫 海边", ""]
    _set_unsafe_probability(checker, 0.8)
    assert np.allclose(checker.scores(texts), 0.8, atol=1e-5)
    assert checker.check(texts) == [True, True, True]
    _set_unsafe_probability(checker, 0.7)  # label 1 still wins, but not above the original's 0.75
    assert checker.check(texts) == [False, False, False]


def test_prompt_checker_scores_are_the_model_softmax(prompt_folder):
    checker = PromptSafetyChecker.from_folder(prompt_folder)
    texts = ["a red cat", "the dog sky", "猫"]
    batch = checker.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(checker.model(**batch).logits, -1)[:, 1]
    alone = [checker.scores([t])[0] for t in texts]
    assert np.allclose(checker.scores(texts), expected.numpy(), atol=1e-6)
    assert np.allclose(alone, expected.numpy(), atol=1e-6)  # padding in a batch changes nothing


def test_paint_refuses_flagged_prompts(prompt_folder):
    model = PaintModel.tiny()
    model.prompt_checker = PromptSafetyChecker.from_folder(prompt_folder)
    _set_unsafe_probability(model.prompt_checker, 0.9)
    rows: list[int] = []
    handle = model.llm.register_forward_hook(lambda mod, args, out: rows.append(args[0].batch_size))
    refused = model.generate(["a cat", "sky"], seeds=[1, 2], sampling=FAST, images_per_prompt=2)
    handle.remove()
    assert rows == []  # nothing was generated
    assert all(r.image is None and r.prompt_flagged and abs(r.prompt_score - 0.9) < 1e-5 for r in refused)
    _set_unsafe_probability(model.prompt_checker, 0.5)
    (ok,) = model.generate(["a cat"], seeds=[1], sampling=FAST)
    assert ok.image is not None and not ok.prompt_flagged and abs(ok.prompt_score - 0.5) < 1e-5


# ---- image checker ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = tmp_path_factory.mktemp("image_checker")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=8)
    StableDiffusionSafetyChecker(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _embed(checker: ImageSafetyChecker, image: Image.Image) -> torch.Tensor:
    pixels = checker.processor(images=[image], return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker.model.visual_projection(checker.model.vision_model(pixels)[1])[0]


def _flag_only(checker: ImageSafetyChecker, image: Image.Image | None) -> None:
    """Concept 0 = `image`'s own embedding (cosine 1 > threshold 0.99); nothing else can fire. None: flag all."""
    with torch.no_grad():
        checker.model.special_care_embeds_weights.fill_(2.0)  # cosine never exceeds 2
        checker.model.concept_embeds_weights.fill_(2.0)
        if image is None:
            checker.model.concept_embeds_weights[0] = -2.0
        else:
            checker.model.concept_embeds[0] = _embed(checker, image)
            checker.model.concept_embeds_weights[0] = 0.99


def test_image_checker_flags_and_blacks_out(image_folder):
    checker = ImageSafetyChecker.from_folder(image_folder)
    bad, good = _image(1), Image.new("RGB", (40, 30), (200, 30, 30))
    _flag_only(checker, bad)
    assert torch.nn.functional.cosine_similarity(_embed(checker, bad), _embed(checker, good), dim=0) < 0.99
    assert checker.check([bad, good, bad]) == [True, False, True]
    arrays = [np.asarray(bad), np.asarray(good)]
    assert checker.check(arrays) == [True, False]  # uint8 arrays too
    filtered, flags = checker.filter([bad, good])
    assert flags == [True, False] and filtered[1] is good
    assert filtered[0].size == bad.size and not np.asarray(filtered[0]).any()
    filtered, _ = checker.filter(arrays)
    assert filtered[0].shape == arrays[0].shape and not filtered[0].any() and filtered[1] is arrays[1]
    with pytest.raises(ValueError, match="uint8"):
        checker.check([np.zeros((4, 4), dtype=np.float32)])


def test_image_checker_needs_a_processor(tmp_path, image_folder):
    (tmp_path / "config.json").write_text((image_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageSafetyChecker.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageSafetyChecker.from_folder(tmp_path / "missing")


def test_paint_blacks_out_flagged_images(image_folder):
    model = PaintModel.tiny()
    model.image_checker = ImageSafetyChecker.from_folder(image_folder)
    _flag_only(model.image_checker, None)
    flagged = model.generate(["a cat", "sky"], seeds=[1, 2], sampling=FAST, output="np")
    assert all(r.nsfw is True and r.image.shape == (32, 32, 3) and not r.image.any() for r in flagged)
    _flag_only(model.image_checker, _image(5))
    (clean,) = model.generate(["a cat"], seeds=[1], sampling=FAST, output="np")
    assert clean.nsfw is False and clean.image.any()


# ---- reranker -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(0)
    config = transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=len(WORDS), max_position_embeddings=64, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=8)
    transformers.ChineseCLIPModel(config).save_pretrained(folder)
    image_processor = transformers.ChineseCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.ChineseCLIPProcessor(image_processor=image_processor, tokenizer=_bert_tokenizer()).save_pretrained(folder)
    return folder


def test_reranker_scores_and_best(reranker_folder):
    ranker = ClipReranker.from_folder(reranker_folder, num_candidates=3)
    images = [_image(i) for i in range(4)]
    scores = ranker.scores("a red cat", images)
    inputs = ranker.processor(text=["a red cat"] * 4, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = torch.diag(ranker.model(**inputs).logits_per_image)  # what the original sorts
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    assert len(set(np.round(scores, 6))) == 4
    assert ranker.best("a red cat", images) == (int(np.argmax(scores)), pytest.approx(max(scores)))
    assert ranker.scores("x", []) == []
    with pytest.raises(ValueError, match="num_candidates"):
        ClipReranker(ranker.model, ranker.processor, num_candidates=0)


def test_paint_keeps_the_best_candidate(reranker_folder):
    model = PaintModel.tiny()
    model.reranker = ClipReranker.from_folder(reranker_folder, num_candidates=3)
    results = model.generate(["a red cat", "sky"], seeds=[10, 20], sampling=FAST, output="np")
    model.reranker = None
    for prompt, seed, r in zip(["a red cat", "sky"], [10, 20], results):
        candidates = model.generate([prompt] * 3, seeds=[candidate_seed(seed, c) for c in range(3)], sampling=FAST,
                                    output="np")
        ranker = ClipReranker.from_folder(reranker_folder)
        scores = ranker.scores(prompt, [c.image for c in candidates])
        assert r.candidate == int(np.argmax(scores)) and r.rerank_score == pytest.approx(max(scores), abs=1e-4)
        assert np.abs(r.image.astype(int) - candidates[r.candidate].image.astype(int)).max() <= 1
        assert r.seed == seed  # the requested seed; the kept candidate's own is candidate_seed(seed, candidate)


def test_from_pretrained_attaches_components(prompt_folder, image_folder, reranker_folder):
    model = PaintModel.from_pretrained("tiny", prompt_checker=prompt_folder, image_checker=image_folder,
                                       reranker=reranker_folder)
    assert isinstance(model.prompt_checker, PromptSafetyChecker)
    assert isinstance(model.image_checker, ImageSafetyChecker)
    assert isinstance(model.reranker, ClipReranker) and model.reranker.num_candidates == 4


# ---- VisCPM-Chat's input-image checker -------------------------------------------------------------------------
def test_chat_reports_and_can_skip_flagged_input_images(image_folder):
    from viscpm import ChatModel, GenerationConfig

    gen = GenerationConfig(strategy="greedy", max_new_tokens=4)
    chat = ChatModel.from_pretrained("tiny", image_checker=image_folder)
    bad, good = _image(1), Image.new("RGB", (40, 30), (200, 30, 30))
    _flag_only(chat.image_checker, bad)
    answered = chat.generate([bad, good], ["what?", "what?"], generation=gen)
    assert [r.image_flagged for r in answered] == [True, False]
    assert all(r.token_ids for r in answered)  # like the original: flagged images are still answered by default
    skipped = chat.generate([bad, good], ["what?", "what?"], generation=gen, skip_flagged=True)
    assert skipped[0].image_flagged and skipped[0].text == "" and skipped[0].token_ids == []
    assert skipped[1].token_ids == answered[1].token_ids and skipped[1].image_flagged is False
    plain = ChatModel.from_pretrained("tiny").generate([bad], ["what?"], generation=gen)[0]
    assert plain.image_flagged is None

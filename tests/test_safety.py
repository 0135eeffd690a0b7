"""Optional Paint components, each a tiny random real model saved to a temporary folder and loaded back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from numeric import assert_pixels_within
from viscpm.paint import PaintModel, SamplingConfig, candidate_seed
from viscpm.safety import ClipReranker, ImageSafetyChecker, PromptSafetyChecker

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

transformers = pytest.importorskip("transformers")

from safety_fixtures import (
    build_image_checker_folder,
    build_prompt_checker_folder,
    build_reranker_folder,
    flag_only,
    image_embedding,
    noise_image,
    set_unsafe_probability,
)

FAST = SamplingConfig(num_inference_steps=2, height=32, width=32)


# ---- prompt checker ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_folder(tmp_path_factory) -> Path:
    return build_prompt_checker_folder(tmp_path_factory.mktemp("prompt_checker"))


def test_prompt_checker_threshold(prompt_folder):
    checker = PromptSafetyChecker.from_folder(prompt_folder)
    texts = ["a red cat", "猫 海边", ""]
    set_unsafe_probability(checker, 0.8)
    assert np.allclose(checker.scores(texts), 0.8, atol=1e-5)
    assert checker.check(texts) == [True, True, True]
    set_unsafe_probability(checker, 0.7)  # label 1 still wins, but not above the original's 0.75
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
    set_unsafe_probability(model.prompt_checker, 0.9)
    rows: list[int] = []
    handle = model.llm.register_forward_hook(lambda mod, args, out: rows.append(args[0].batch_size))
    refused = model.generate(["a cat", "sky"], seeds=[1, 2], sampling=FAST, images_per_prompt=2)
    handle.remove()
    assert rows == []  # nothing was generated
    assert all(r.image is None and r.prompt_flagged and abs(r.prompt_score - 0.9) < 1e-5 for r in refused)
    set_unsafe_probability(model.prompt_checker, 0.5)
    (ok,) = model.generate(["a cat"], seeds=[1], sampling=FAST)
    assert ok.image is not None and not ok.prompt_flagged and abs(ok.prompt_score - 0.5) < 1e-5


# ---- image checker ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return build_image_checker_folder(tmp_path_factory.mktemp("image_checker"))


def test_image_checker_flags_and_blacks_out(image_folder):
    checker = ImageSafetyChecker.from_folder(image_folder)
    bad, good = noise_image(1), Image.new("RGB", (40, 30), (200, 30, 30))
    flag_only(checker, bad)
    assert torch.nn.functional.cosine_similarity(image_embedding(checker, bad), image_embedding(checker, good), dim=0) < 0.99
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
    flag_only(model.image_checker, None)
    flagged = model.generate(["a cat", "sky"], seeds=[1, 2], sampling=FAST, output="np")
    assert all(r.nsfw is True and r.image.shape == (32, 32, 3) and not r.image.any() for r in flagged)
    flag_only(model.image_checker, noise_image(5))
    (clean,) = model.generate(["a cat"], seeds=[1], sampling=FAST, output="np")
    assert clean.nsfw is False and clean.image.any()


# ---- reranker -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory) -> Path:
    return build_reranker_folder(tmp_path_factory.mktemp("reranker"))


def test_reranker_scores_and_best(reranker_folder):
    ranker = ClipReranker.from_folder(reranker_folder, num_candidates=3)
    images = [noise_image(i) for i in range(4)]
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
        # the kept candidate was rendered in a batch of 3 candidates, each candidate here too, in another batch
        assert_pixels_within(r.image, candidates[r.candidate].image, f"kept candidate of {prompt!r}")
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
    bad, good = noise_image(1), Image.new("RGB", (40, 30), (200, 30, 30))
    flag_only(chat.image_checker, bad)
    answered = chat.generate([bad, good], ["what?", "what?"], generation=gen)
    assert [r.image_flagged for r in answered] == [True, False]
    assert all(r.token_ids for r in answered)  # like the original: flagged images are still answered by default
    skipped = chat.generate([bad, good], ["what?", "what?"], generation=gen, skip_flagged=True)
    assert skipped[0].image_flagged and skipped[0].text == "" and skipped[0].token_ids == []
    assert skipped[1].token_ids == answered[1].token_ids and skipped[1].image_flagged is False
    # follow-up questions: the vision states stand for the pixels, the images are still checked
    states = chat.encode_images([bad, good])
    again = chat.generate([bad, good], ["what?", "what?"], generation=gen, vision_states=states)
    assert [r.image_flagged for r in again] == [True, False]
    assert [r.token_ids for r in again] == [r.token_ids for r in answered]
    plain = ChatModel.from_pretrained("tiny").generate([bad], ["what?"], generation=gen)[0]
    assert plain.image_flagged is None

"""Tiny REAL optional Paint components (random weights), written to folders the way their loaders expect them, and
the weight edits that force a checker's verdict. Shared by tests/test_safety.py (the components alone) and
tests/test_paint_job_e2e.py (the paint job loading them from folders in its actors).

transformers (and diffusers, for the image checker) are imported only when a builder runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "dog", "the", "red",
         "sky", "a", "猫", "狗", "海", "边"]
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def bert_tokenizer() -> Any:
    import transformers

    vocab = {w: i for i, w in enumerate(WORDS)}
    try:
        return transformers.BertTokenizer(vocab=vocab)  # transformers >= 5
    except TypeError:  # pragma: no cover - transformers 4.x takes a vocab file
        import tempfile

        path = Path(tempfile.mkdtemp()) / "vocab.txt"
        path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
        return transformers.BertTokenizer(vocab_file=str(path))


def noise_image(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---- prompt checker ------------------------------------------------------------------------------------------
def build_prompt_checker_folder(folder: Path) -> Path:
    """A BertForSequenceClassification (2 labels) + its tokenizer: what `PromptSafetyChecker.from_folder` loads."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), max_position_embeddings=64, num_labels=2, **SMALL)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)
    return folder


def set_unsafe_probability(checker: Any, p: float) -> None:
    """Make the classifier output a constant P(label 1) = p whatever the text."""
    with torch.no_grad():
        checker.model.classifier.weight.zero_()
        checker.model.classifier.bias.copy_(torch.tensor([0.0, float(np.log(p / (1 - p)))]))


# ---- image checker ---------------------------------------------------------------------------------------------
def build_image_checker_folder(folder: Path) -> Path:
    """diffusers' StableDiffusionSafetyChecker (tiny CLIP) + a CLIP image processor (32x32)."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=8)
    StableDiffusionSafetyChecker(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def image_embedding(checker: Any, image: Image.Image | np.ndarray) -> torch.Tensor:
    """The checker's CLIP image embedding (what it compares with its concept embeddings)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    pixels = checker.processor(images=[image], return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker.model.visual_projection(checker.model.vision_model(pixels)[1])[0]


def flag_only(checker: Any, image: Image.Image | None) -> None:
    """Concept 0 = `image`'s own embedding (cosine 1 > threshold 0.99); nothing else can fire. None: flag all."""
    with torch.no_grad():
        checker.model.special_care_embeds_weights.fill_(2.0)  # cosine never exceeds 2
        checker.model.concept_embeds_weights.fill_(2.0)
        if image is None:
            checker.model.concept_embeds_weights[0] = -2.0
        else:
            checker.model.concept_embeds[0] = image_embedding(checker, image)
            checker.model.concept_embeds_weights[0] = 0.99


# ---- reranker -----------------------------------------------------------------------------------------------
def build_reranker_folder(folder: Path) -> Path:
    """A ChineseCLIPModel (tiny) + its processor (BERT tokenizer, 32x32 image processor)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=len(WORDS), max_position_embeddings=64, **SMALL),
        vision_config=dict(image_size=32, patch_size=8, **SMALL), projection_dim=8)
    transformers.ChineseCLIPModel(config).save_pretrained(folder)
    image_processor = transformers.ChineseCLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32})
    transformers.ChineseCLIPProcessor(image_processor=image_processor,
                                      tokenizer=bert_tokenizer()).save_pretrained(folder)
    return folder

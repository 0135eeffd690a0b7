"""Optional safety and quality components, each loaded from a local folder (no hub access), off by default.

* :class:`PromptSafetyChecker` - a BERT sequence classifier (VisCPM-Paint's `text-security-checker`); a prompt
  is unsafe when label 1 scores above 0.75, the original's rule.
* :class:`ImageSafetyChecker` - diffusers' ``StableDiffusionSafetyChecker`` (CLIP concept matching) with its
  CLIP image processor; ``check(images) -> list[bool]`` works on any PIL images (generated ones, or Chat's
  input images), ``filter`` also blacks the flagged ones out.
* :class:`ClipReranker` - Chinese-CLIP text-image similarity: draw N candidates, keep the best (the original
  draws 4 per image).

Verdicts and scores are returned as data; nothing is printed. transformers is imported only when a component
is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import torch_dtype
from .folders import model_folder_problem

logger = logging.getLogger(__name__)

PROMPT_UNSAFE_THRESHOLD = 0.75  # the original: label 'LABEL_1' with score > 0.75
DEFAULT_CANDIDATES = 4  # the original's ranker draws 4 images per requested image


def _folder(path: str | Path, kind: str = "component") -> Path:
    folder = Path(path)
    names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else None
    problem = model_folder_problem(kind, names, str(folder))
    if problem:
        raise FileNotFoundError(problem)
    return folder


def _as_pil(images: Sequence[Image.Image | np.ndarray]) -> list[Image.Image]:
    out = []
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"image {i}: arrays must be (H, W, 3) uint8, got {im.dtype} {im.shape}")
            im = Image.fromarray(im)
        elif not isinstance(im, Image.Image):
            raise ValueError(f"image {i} must be a PIL image or a uint8 array, got {type(im).__name__}")
        out.append(im.convert("RGB"))
    return out


class PromptSafetyChecker:
    """`scores(texts)`: probability of label 1 (unsafe); `check(texts)`: score > threshold."""

    def __init__(self, model: Any, tokenizer: Any, threshold: float = PROMPT_UNSAFE_THRESHOLD,
                 max_length: int = 512, batch_size: int = 32) -> None:
        if model.config.num_labels < 2:
            raise ValueError(f"the prompt checker needs >= 2 labels, the model has {model.config.num_labels}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.threshold, self.batch_size = threshold, batch_size
        self.max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    threshold: float = PROMPT_UNSAFE_THRESHOLD) -> "PromptSafetyChecker":
        """A folder with a BertForSequenceClassification (config.json + weights) and its tokenizer files."""
        from transformers import AutoTokenizer, BertForSequenceClassification

        folder = _folder(path)
        model = BertForSequenceClassification.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model.to(device=device, dtype=torch_dtype(dtype)), tokenizer, threshold=threshold)

    @torch.inference_mode()
    def scores(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            # truncation: the original's pipeline would fail on prompts beyond BERT's 512 positions
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            logits = self.model(**batch).logits.float()
            out += torch.softmax(logits, dim=-1)[:, 1].tolist()
        return out

    def check(self, texts: Sequence[str]) -> list[bool]:
        """True = unsafe."""
        return [s > self.threshold for s in self.scores(texts)]


class ImageSafetyChecker:
    """`check(images) -> list[bool]` (True = NSFW); `filter(images)` also returns the flagged ones blacked out."""

    def __init__(self, model: Any, processor: Any, batch_size: int = 16) -> None:
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    processor_path: str | Path | None = None) -> "ImageSafetyChecker":
        """A folder with the StableDiffusionSafetyChecker (config.json + weights) and a CLIP image processor
        (preprocessor_config.json there, or in `processor_path`: the original took it from clip-vit-base-patch32)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = _folder(path)
        proc_folder = Path(processor_path) if processor_path is not None else folder
        if not (proc_folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{proc_folder} has no preprocessor_config.json (the CLIP image processor)")
        model = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(proc_folder, local_files_only=True)
        return cls(model.to(device=device, dtype=torch_dtype(dtype)), processor)

    @torch.inference_mode()
    def check(self, images: Sequence[Image.Image | np.ndarray]) -> list[bool]:
        pil = _as_pil(images)
        param = next(self.model.parameters())
        flags: list[bool] = []
        for start in range(0, len(pil), self.batch_size):
            chunk = pil[start : start + self.batch_size]
            clip_input = self.processor(images=chunk, return_tensors="pt").pixel_values.to(param.device, param.dtype)
            # the diffusers checker blacks out its `images` argument in place: give it placeholders
            placeholders = np.zeros((len(chunk), 1), dtype=np.float32)
            _, has_nsfw = self.model(clip_input=clip_input, images=placeholders)
            flags += [bool(x) for x in has_nsfw]
        return flags

    def filter(self, images: Sequence[Image.Image | np.ndarray]) -> tuple[list[Image.Image | np.ndarray], list[bool]]:
        """(images with the flagged ones replaced by black images of the same size and type, flags)."""
        flags = self.check(images)
        out: list[Image.Image | np.ndarray] = []
        for im, flagged in zip(images, flags):
            if not flagged:
                out.append(im)
            elif isinstance(im, np.ndarray):
                out.append(np.zeros_like(im))
            else:
                out.append(Image.new("RGB", im.size))
        return out, flags


class ClipReranker:
    """Chinese-CLIP similarity of one text to many images; `best` picks the highest (best-of-N)."""

    def __init__(self, model: Any, processor: Any, num_candidates: int = DEFAULT_CANDIDATES) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.model, self.processor, self.num_candidates = model.eval(), processor, num_candidates

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    num_candidates: int = DEFAULT_CANDIDATES) -> "ClipReranker":
        """A folder with a ChineseCLIPModel and its processor (tokenizer + image processor files)."""
        from transformers import ChineseCLIPModel, ChineseCLIPProcessor

        folder = _folder(path)
        model = ChineseCLIPModel.from_pretrained(folder, local_files_only=True)
        processor = ChineseCLIPProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model.to(device=device, dtype=torch_dtype(dtype)), processor, num_candidates=num_candidates)

    @torch.inference_mode()
    def scores(self, text: str, images: Sequence[Image.Image | np.ndarray]) -> list[float]:
        """CLIP logits (logit_scale * cosine) of each image against `text` - the diagonal the original sorts."""
        if not images:
            return []
        param = next(self.model.parameters())
        limit = min(int(getattr(self.processor.tokenizer, "model_max_length", 512)),
                    int(self.model.config.text_config.max_position_embeddings))
        inputs = self.processor(text=[text], images=_as_pil(images), return_tensors="pt", padding=True,
                                truncation=True, max_length=limit)
        inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                  for k, v in inputs.items()}
        return self.model(**inputs).logits_per_image[:, 0].float().tolist()

    def best(self, text: str, images: Sequence[Image.Image | np.ndarray]) -> tuple[int, float]:
        """(index of the best image, its score); ties go to the first."""
        scores = self.scores(text, images)
        if not scores:
            raise ValueError("best() needs at least one image")
        i = int(np.argmax(scores))
        return i, scores[i]


__all__ = ["ClipReranker", "ImageSafetyChecker", "PromptSafetyChecker", "PROMPT_UNSAFE_THRESHOLD"]

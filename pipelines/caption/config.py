"""The caption job's configuration: the shared options of `core.config.JobConfig` plus the caption job's own.
This module imports neither Ray nor torch (viscpm's configs are torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from viscpm import DEFAULT_QUESTION, GENERATION_PRESETS, STRATEGIES, GenerationConfig

from ..core.config import OUTPUT_FORMATS, JobConfig, _f
from .schema import reserved_column_problems

INPUT_FORMATS = ("parquet", "webdataset", "images")
PRESETS = tuple(GENERATION_PRESETS)
# Pillow's own default (Image.MAX_IMAGE_PIXELS); repeated here so this module does not import PIL.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class CaptionJobConfig(JobConfig):
    """Everything `jobs/caption.py` needs. Field names are the flags (`image_column` -> `--image-column`)."""

    at_least_one: ClassVar[tuple[str, ...]] = (*JobConfig.at_least_one, "decode_batch_size", "max_image_pixels")
    cpu_batch_size: ClassVar[int] = 8
    gpu_batch_size: ClassVar[int] = 32
    job: ClassVar[str] = "caption"

    # ---- input ------------------------------------------------------------------------------------------------
    input_format: str = _f("parquet", "parquet: rows with an image column; webdataset: .tar shards; images: a "
                           "folder/prefix of image files (id = relative path).", choices=INPUT_FORMATS,
                           group="input", fingerprint=True)
    image_column: str = _f("image", "parquet: column holding image bytes, strings that are paths/URIs to read "
                           "(relative paths are resolved against the input folder), or HuggingFace `datasets` "
                           "images (struct<bytes, path>: the bytes, else the path).", group="input", fingerprint=True)
    id_column: str | None = _f(None, "parquet: column holding the unique row id (any type; stored as a string in "
                               "`key`). Default: `id` when the files have it, else ids derived from the input file and "
                               "row: `<file path relative to the input folder>#<row index from 0>`. A column named "
                               "here must exist.", group="input", fingerprint=True)
    image_key: str | None = _f(None, "webdataset: member suffix holding the image (default: the first of jpg, jpeg, "
                               "png, webp present in the sample).", group="input", fingerprint=True)
    question_column: str | None = _f(None, "Column (parquet) or member suffix (webdataset) holding a per-row "
                                     "question; rows where it is empty use --question.", group="input",
                                     fingerprint=True)
    keep_columns: list[str] = _f([], "Input columns (parquet) or member suffixes (webdataset, as bytes) copied to "
                                 "the output unchanged; `source=name` writes one under another name "
                                 "(`caption=alt_text` keeps an input column named like an output column).",
                                 group="input", fingerprint=True)

    # ---- output -----------------------------------------------------------------------------------------------
    output_format: str = _f("parquet", "parquet: one row per id (see the schema in the README); webdataset: tar "
                            "shards with `<key>.txt` (caption) and `<key>.json` (the full row).",
                            choices=OUTPUT_FORMATS, group="output", fingerprint=True)
    report: bool = _f(False, "Write `_report.html` under --output: a self-contained contact sheet of the whole "
                      "output (error rows first, then a deterministic sample) with each row's image - read back "
                      "from the input after the run - key, status, question and caption. Not with --incremental.",
                      group="output")

    # ---- model ------------------------------------------------------------------------------------------------
    model: str = _f("tiny", "`tiny` (random weights: captions are random text), a local model folder, or an "
                    "s3:// prefix (downloaded once per node into --model-cache-dir under a file lock).",
                    group="model", fingerprint=True)
    question: str = _f(DEFAULT_QUESTION, "The question asked about every image (or the fallback for "
                       "--question-column).", group="model", fingerprint=True)
    preset: str = _f("default", "Generation preset: `default` (beam 3, 64 new tokens, VisCPM's penalties) or "
                     "`original` (VisCPM-Chat's chat() settings: beam 3, max_length 512).", choices=PRESETS,
                     group="model", fingerprint=True)
    strategy: str | None = _f(None, "Decoding strategy (default: the preset's).", choices=STRATEGIES,
                              group="model", fingerprint=True)
    max_new_tokens: int | None = _f(None, "Longest answer in tokens (default: the preset's).", group="model",
                                    fingerprint=True)
    beam_size: int | None = _f(None, "Beams for `beam` decoding (default: the preset's).", group="model",
                               fingerprint=True)
    image_safety: str | None = _f(None, "Folder (local or s3://) of the image safety checker (SD safety checker + "
                                  "CLIP image processor): each row's verdict goes to `image_flagged` (flagged images "
                                  "are still captioned). Off by default.", group="model", fingerprint=True)
    max_image_side: int = _f(448, "Decoded images are downscaled (JPEG draft mode, then a thumbnail) so their "
                             "longer side is at most this; 0 keeps full size. The decode tasks then resize that to "
                             "the model's input size (224 for VisCPM-Chat) exactly as the model would; with "
                             "--image-safety the model resizes.", group="model", fingerprint=True)
    max_image_pixels: int = _f(PILLOW_MAX_IMAGE_PIXELS, "Decompression-bomb limit: images with more pixels are "
                               "error rows (Pillow's default).", group="model")

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int | None = _f(None, "Images per model call (default: 8 on CPU, 32 per GPU actor: 32 prompts x 3 "
                                "beams of 250 + 50 tokens take 9.9 GiB of KV cache beside 19.1 GiB of bf16 weights).",
                                group="resources")
    decode_batch_size: int = _f(64, "Rows per block between stages: one decode task batch and one caption actor "
                                "call (which runs the model in --batch-size chunks). Bigger amortises Ray's per-call "
                                "overhead; smaller spreads few rows over more actors.", group="resources")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep_columns, str):
            self.keep_columns = [c for c in self.keep_columns.split(",") if c]

    def job_problems(self) -> list[str]:
        problems = []
        if self.max_image_side < 0:
            problems.append(f"--max-image-side must be >= 0, got {self.max_image_side}")
        if self.image_key is not None and self.input_format != "webdataset":
            problems.append("--image-key applies to --input-format webdataset only")
        if self.input_format == "images" and (self.keep_columns or self.question_column):
            problems.append("--input-format images has no columns: --keep-columns/--question-column do not apply")
        if self.incremental and self.input_format == "images":
            problems.append("--incremental works on input files that hold many rows (--input-format parquet or "
                            "webdataset), not on single image files")
        if self.incremental and self.report:
            problems.append("--report covers one output written by normal runs; it is not available with "
                            "--incremental")
        problems += reserved_column_problems(self.keep_columns)
        try:
            self.generation_kwargs()
        except ValueError as exc:
            problems.append(f"generation settings: {exc}")
        return problems

    def model_sources(self) -> list[tuple[str, str | None, str]]:
        return [("--model", self.model, "chat"), ("--image-safety", self.image_safety, "image-safety")]

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `viscpm.GenerationConfig`: the preset, then the explicit flags."""
        base = GenerationConfig.from_name(self.preset)
        overrides = {k: v for k, v in (("strategy", self.strategy), ("max_new_tokens", self.max_new_tokens),
                                       ("beam_size", self.beam_size)) if v is not None}
        merged = {**asdict(base), **overrides}
        GenerationConfig(**merged)  # raises ValueError on bad values
        return merged

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide what the output contains: resuming is allowed only when they are equal."""
        fp = self.fingerprint_fields()
        fp["generation"] = self.generation_kwargs()
        for name in ("strategy", "max_new_tokens", "beam_size", "preset"):
            fp.pop(name)  # folded into `generation`: the effective values are what matters
        fp["keep_columns"] = list(self.keep_columns)
        # unset means `id` whenever the input has that column (inputs without one were refused before derived ids
        # existed), so outputs written when `id` was the default still resume
        fp["id_column"] = self.id_column or "id"
        return fp



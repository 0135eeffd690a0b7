"""The paint job's configuration: the shared options of `core.config.JobConfig` plus the paint job's own.
This module imports neither Ray nor torch (viscpm's configs are torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from viscpm import SamplingConfig

from ..core.config import OUTPUT_FORMATS, JobConfig, _f
from .schema import IMAGE_FORMATS, SCHEDULERS, VISCPM_SCHEDULER, reserved_column_problems


def parse_size(size: str | int | None) -> tuple[int | None, int | None]:
    """`--size`: `512` (square) or `768x512` (WIDTHxHEIGHT); None/""/0: the model's native size."""
    if size in (None, "", 0, "0"):
        return None, None
    text = str(size).lower().strip()
    try:
        if "x" in text:
            w, h = text.split("x", 1)
            return int(w), int(h)
        return int(text), int(text)
    except ValueError as exc:
        raise ValueError(f"--size must be N or WIDTHxHEIGHT, got {size!r}") from exc


@dataclass
class PaintJobConfig(JobConfig):
    """Everything `jobs/paint.py` needs. Field names are the flags (`prompt_column` -> `--prompt-column`)."""

    at_least_one: ClassVar[tuple[str, ...]] = (*JobConfig.at_least_one, "images_per_prompt", "steps")
    job: ClassVar[str] = "paint"
    cpu_batch_size: ClassVar[int] = 4
    gpu_batch_size: ClassVar[int] = 8

    # ---- input ------------------------------------------------------------------------------------------------
    input: str = _f("", "Local path or s3:// URI of a prompt file (.txt/.jsonl/.csv/.tsv/.parquet), a folder or a "
                    "prefix; or specs: brace ranges/lists, globs, several joined with ::.", group="input",
                    fingerprint=True)
    prompt_column: list[str] = _f(["prompt"], "Column holding the prompt (jsonl/csv/tsv/parquet); several names "
                                  "(`Prompt,Prompts,caption,text`): the first one present in each file is used (the "
                                  "log names it). Optional columns: the key column, negative_prompt, seed.",
                                  group="input", fingerprint=True)
    key_column: str | None = _f(None, "Column holding each prompt's key (any type, as a string; unique over all "
                                "files), e.g. COCO's `id`; a column named here must be in every file (.txt files have "
                                "none). Default: `key` where a file has it, else the line/record/row number.",
                                group="input", fingerprint=True)
    keep_columns: list[str] = _f([], "Prompt-file columns copied into every image row of their prompt (a Parquet "
                                 "column; a field of the WebDataset json), null where a file lacks one; "
                                 "`source=name` writes one under another name (`key=source_key`).", group="input",
                                 fingerprint=True)

    # ---- output -----------------------------------------------------------------------------------------------
    output_format: str = _f("webdataset", "webdataset: tar shards, per image `<key>.<png|jpg|webp>` + `<key>.json`; "
                            "parquet: one row per image with the image bytes in `image`.", choices=OUTPUT_FORMATS,
                            group="output", fingerprint=True)
    image_format: str = _f("png", "Encoding of the images.", choices=IMAGE_FORMATS, group="output",
                           fingerprint=True)
    rows_per_file: int = _f(256, "Images per output file (the unit of resume).", group="output")
    report: bool = _f(False, "Write `_report.html` (a contact sheet of the first images) under --output.",
                      group="output")

    # ---- model ------------------------------------------------------------------------------------------------
    model: str = _f("tiny", "`tiny` (random weights), a local model folder, or an s3:// prefix.", group="model",
                    fingerprint=True)
    images_per_prompt: int = _f(1, "Images per prompt.", group="model", fingerprint=True)
    steps: int = _f(50, "Denoising steps.", group="model", fingerprint=True)
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale.", group="model", fingerprint=True)
    size: str | int | None = _f(None, "Image size: N (square) or WIDTHxHEIGHT, multiples of 8 (default: the model's, "
                          "512 for VisCPM-Paint, 64 for tiny).",
                          group="model", fingerprint=True)
    scheduler: str = _f("ddpm", "ddpm (the original) or dpmsolver (DPM-Solver++, fewer steps).",
                        choices=SCHEDULERS, group="model", fingerprint=True)
    seed: int = _f(0, "Base seed: images without a `seed` column value get a seed derived from (seed, prompt key, "
                   "image index).", group="model", fingerprint=True)
    negative_prompt: str | None = _f(None, "Negative prompt for rows without a `negative_prompt` value.",
                                     group="model", fingerprint=True)
    prompt_safety: str | None = _f(None, "Folder (local or s3://) of the prompt safety checker (a BERT "
                                   "classifier): a flagged prompt's images get status `blocked` and no image. Off "
                                   "by default.",
                                   group="model", fingerprint=True)
    image_safety: str | None = _f(None, "Folder (local or s3://) of the image safety checker (SD safety checker "
                                  "+ CLIP image processor): flagged images are blacked out, `nsfw` true. Off by "
                                  "default.",
                                  group="model", fingerprint=True)
    rerank: int = _f(0, "Best-of-N: draw N candidates per image and keep the one the Chinese-CLIP reranker "
                     "(--reranker) scores highest; 0: off.", group="model", fingerprint=True)
    reranker: str | None = _f(None, "Folder (local or s3://) of the Chinese-CLIP reranker (needed by --rerank).",
                              group="model", fingerprint=True)

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int | None = _f(None, "Images per model call (UNet batch: twice as many rows with guidance; "
                                "default: 4 on CPU, 8 per GPU actor).", group="resources")
    bitwise_reproducible: bool = _f(False, "Render each image in its own model call (the actor still takes "
                                    "--batch-size rows at a time), so its bytes never depend on --batch-size, "
                                    "--num-workers or a resume; slower on GPU. Without it, the same command on the "
                                    "same hardware gives the same bytes, but a batched UNet call can move a pixel "
                                    "by 1 when the batch changes.", group="resources")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.size, int):
            self.size = str(self.size)
        for name in ("prompt_column", "keep_columns"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [c.strip() for c in getattr(self, name).split(",") if c.strip()])

    def model_sources(self) -> list[tuple[str, str | None, str]]:
        """(flag, value, folder kind) of every model folder the actors will load (checked on the driver first)."""
        return [("--model", self.model, "paint"), ("--prompt-safety", self.prompt_safety, "component"),
                ("--image-safety", self.image_safety, "image-safety"),
                ("--reranker", self.reranker if self.rerank else None, "component")]

    def job_problems(self) -> list[str]:
        problems = []
        if self.rerank < 0:
            problems.append(f"--rerank must be >= 0, got {self.rerank}")
        if self.rerank and not self.reranker:
            problems.append("--rerank needs --reranker FOLDER (the Chinese-CLIP reranker)")
        if self.reranker and not self.rerank:
            problems.append("--reranker needs --rerank N, the candidates per image (the original drew 4)")
        if not self.prompt_column:
            problems.append("--prompt-column needs at least one column name")
        if self.key_column is not None and not self.key_column.strip():
            problems.append("--key-column must name a column")
        problems += reserved_column_problems(self.keep_columns)
        if not 0 <= self.seed < 2 ** 63:
            problems.append(f"--seed must be in [0, 2**63), got {self.seed}")
        try:
            self.sampling_kwargs()
        except ValueError as exc:
            problems.append(f"sampling settings: {exc}")
        return problems

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `viscpm.SamplingConfig` (checked by it)."""
        width, height = parse_size(self.size)
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": float(self.guidance_scale),
                  "height": height, "width": width, "scheduler": VISCPM_SCHEDULER[self.scheduler]}
        SamplingConfig(**kwargs)
        return kwargs

    def fingerprint(self) -> dict[str, Any]:
        fp = self.fingerprint_fields()
        fp["sampling"] = self.sampling_kwargs()
        fp["job"] = "paint"  # a caption job's output is never resumed as a paint job's
        # outputs written before these options existed still resume: at their defaults they are left out, and one
        # prompt column is the string it was
        if len(self.prompt_column) == 1:
            fp["prompt_column"] = self.prompt_column[0]
        for name, default in (("key_column", None), ("keep_columns", [])):
            if fp[name] == default:
                fp.pop(name)
        return fp

"""Paint stage (actor pool): the Paint model is loaded once per actor, then renders batch after batch of image rows
(one row = one (prompt key, image index) with its own seed; see `pipelines.prompts`).

Same conventions as the caption stage (`pipelines.captioner`): an actor that Ray gave GPUs runs on `cuda` (bf16
CPM-Bee, the model's default dtypes), otherwise on CPU in fp32; a batch the model fails on is retried row by row so a
bad row becomes one error row; each row carries the `__actor`/`__gpu_ids`/`__model_s` bookkeeping columns that the
shared `WriteStage` folds into per-actor stats.

Every row is passed to `PaintModel.generate` as its own prompt with `images_per_prompt=1` and its own seed, so an
image's noise and text encoding depend only on (prompt, negative prompt, seed, sampling settings). The UNet/VAE run
`model_batch_size` images per call, and a batched kernel computes an image's floats slightly differently from a
call of another size, so a pixel can move by 1 when its batch changes (other --batch-size, a resume). The job's
--bitwise-reproducible passes `model_batch_size=1`: one image per call, bytes independent of batching.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from . import schema as S
from .actors import ModelClock, ModelStage
from .decode import error_text
from .paint_schema import (
    BLOCKED,
    IMAGE_BYTES,
    IMAGE_FORMATS,
    PAINT_RESULT_FIELDS,
    SETTINGS_FIELDS,
)
from .prompts import NEGATIVE_COLUMN, PROMPT, SEED_COLUMN
from .stages import Column

logger = logging.getLogger(__name__)

_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def encode_image(array: Any, image_format: str) -> bytes:
    """uint8 HxWx3 -> file bytes. Deterministic for a given Pillow build: PNG and lossless WebP carry no
    timestamps; JPEG at quality 95 without chroma subsampling."""
    from PIL import Image

    image = Image.fromarray(array)
    sink = io.BytesIO()
    if image_format == "png":
        image.save(sink, "PNG")
    elif image_format == "jpg":
        image.save(sink, "JPEG", quality=95, subsampling=0)  # 4:4:4: no chroma halving
    elif image_format == "webp":
        image.save(sink, "WEBP", lossless=True)
    else:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return sink.getvalue()


def load_paint_model(spec: str, device: str = "cpu", dtype: str | None = None,
                     storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                     prompt_safety: str | None = None, image_safety: str | None = None,
                     reranker: str | None = None, rerank: int = 0) -> Any:
    """`tiny` | local folder | s3:// prefix (downloaded once per node, as the caption models) -> PaintModel, with
    the optional component folders (local or s3://, fetched the same way); `rerank` > 0: the reranker keeps the
    best of that many candidates."""
    from viscpm import PaintModel

    from .models import fetch_model_folder
    from .storage import is_remote

    def local(folder: str | None) -> str | None:
        if folder is None or not is_remote(folder):
            return folder
        return str(fetch_model_folder(folder, storage_options, cache_dir))

    return PaintModel.from_pretrained(local(spec), device=device, dtype=dtype, prompt_checker=local(prompt_safety),
                                      image_checker=local(image_safety),
                                      reranker=local(reranker) if rerank > 0 else None,
                                      rerank_candidates=rerank or None)


class PaintStage(ModelStage):
    name = "paint"
    requires = (
        Column(S.KEY, "image key <prompt key>-<index>"),
        Column(PROMPT, "prompt text"),
        Column(NEGATIVE_COLUMN, "negative prompt (null: none)"),
        Column(SEED_COLUMN, "the image's seed"),
        Column(S.STATUS, "'ok' rows are rendered, 'error' rows pass through"),
        Column(S.ERROR, "error message of failed rows"),
    )
    produces = (Column(IMAGE_BYTES, "encoded image (null: blocked/error)"),
                *(Column(f.name, "paint setting/result") for f in (*SETTINGS_FIELDS, *PAINT_RESULT_FIELDS)))

    def __init__(self, model: str, sampling: Mapping[str, Any], use_gpu: bool = False, dtype: str | None = None,
                 model_label: str | None = None, image_format: str = "png",
                 storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                 model_batch_size: int = 8, torch_threads: int | None = None, prompt_safety: str | None = None,
                 image_safety: str | None = None, reranker: str | None = None, rerank: int = 0,
                 loaded_model: Any = None) -> None:
        """`loaded_model`: an already built PaintModel (tests; never shipped through Ray)."""

        from viscpm import SamplingConfig

        self.place(use_gpu, torch_threads)
        started = time.monotonic()
        self.model = loaded_model if loaded_model is not None else load_paint_model(
            model, device=self.device, dtype=dtype, storage_options=storage_options, cache_dir=cache_dir,
            prompt_safety=prompt_safety, image_safety=image_safety, reranker=reranker, rerank=rerank)
        self.sampling = SamplingConfig(**dict(sampling))
        self.model_label = model_label or model
        self.image_format = image_format
        self.model_batch_size = model_batch_size
        size = self.model.config.default_size
        self.height, self.width = self.sampling.height or size, self.sampling.width or size
        logger.info("paint actor %s: model %s on %s (GPUs %s) loaded in %.1f s", self.actor_id, model, self.device,
                    self.gpu_ids or "-", time.monotonic() - started)

    def _generate(self, prompts: list[str], negatives: list[str | None], seeds: list[int]
                  ) -> list[tuple[Any, str | None]]:
        """(PaintResult, None) or (None, error message) per row."""
        return self.call_isolated(
            lambda ps, ns, ss: self.model.generate(ps, ns, seeds=ss, sampling=self.sampling, images_per_prompt=1,
                                                   output="np", batch_size=self.model_batch_size),
            prompts, negatives, seeds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        n = batch.num_rows
        status = batch.column(S.STATUS).to_pylist()
        errors = batch.column(S.ERROR).to_pylist()
        prompts = batch.column(PROMPT).to_pylist()
        negatives = batch.column(NEGATIVE_COLUMN).to_pylist()
        seeds = batch.column(SEED_COLUMN).to_pylist()
        todo = [i for i in range(n) if status[i] == S.STATUS_OK]
        images: list[bytes | None] = [None] * n
        results: dict[str, list[Any]] = {f.name: [None] * n for f in PAINT_RESULT_FIELDS}
        clock = ModelClock(n)
        step = max(1, self.model_batch_size)
        for c in range(0, len(todo), step):
            chunk = todo[c:c + step]
            t0 = time.time()
            outcomes = self._generate([prompts[i] for i in chunk], [negatives[i] for i in chunk],
                                      [seeds[i] for i in chunk])
            t1 = time.time()
            clock.record(chunk, t0, t1)
            for i, (result, error) in zip(chunk, outcomes, strict=True):
                if error is not None:
                    status[i], errors[i] = S.STATUS_ERROR, error
                    continue
                for f in PAINT_RESULT_FIELDS:
                    results[f.name][i] = getattr(result, f.name)
                if result.prompt_flagged:
                    status[i] = BLOCKED
                    continue
                try:
                    images[i] = encode_image(result.image, self.image_format)
                except Exception as exc:  # noqa: BLE001
                    status[i], errors[i] = S.STATUS_ERROR, error_text("encode", exc)
        out = batch.set_column(batch.schema.get_field_index(S.STATUS), S.STATUS, pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index(S.ERROR), S.ERROR, pa.array(errors, pa.string()))
        scheduler = "dpmsolver" if self.sampling.scheduler == "dpmsolver++" else self.sampling.scheduler  # CLI name
        settings = {"steps": self.sampling.num_inference_steps, "guidance_scale": float(self.sampling.guidance_scale),
                    "scheduler": scheduler, "size": f"{self.width}x{self.height}", "width": self.width,
                    "height": self.height, "model": self.model_label, "image_format": self.image_format}
        columns: dict[str, pa.Array] = {IMAGE_BYTES: pa.array(images, pa.binary())}
        for f in SETTINGS_FIELDS:
            columns[f.name] = pa.array([settings[f.name]] * n, f.type)
        for f in PAINT_RESULT_FIELDS:
            columns[f.name] = pa.array(results[f.name], f.type)
        columns.update(self.bookkeeping_columns(clock))
        for name, array in columns.items():
            out = out.append_column(name, array)
        return out

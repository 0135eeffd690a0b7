"""Paint stage (actor pool): the Paint model is loaded once per actor, then renders batch after batch of image rows
(one row = one (prompt key, image index) with its own seed; see `paint.prompts`).

Same conventions as the caption stage (`core.model_stage`): an actor that Ray gave GPUs runs on `cuda` (bf16
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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from ..core import columns as C
from ..core import metrics
from ..core.model_cache import local_model_folder
from ..core.model_stage import ModelStage
from ..core.stage import Column, error_text
from .schema import (BLOCKED, IMAGE_BYTES, IMAGE_FORMATS, JOB_SCHEDULER, NEGATIVE_COLUMN, PAINT_RESULT_FIELDS, PROMPT,
                     SEED_COLUMN, SETTINGS_FIELDS)

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
                     reranker: str | None = None, rerank: int = 0, compile: bool = False) -> Any:
    """`tiny` | local folder | s3:// prefix (downloaded once per node, as the caption models) -> PaintModel, with
    the optional component folders (local or s3://, fetched the same way); `rerank` > 0: the reranker keeps the
    best of that many candidates."""
    from viscpm import PaintModel

    def local(folder: str | None) -> str | None:
        return local_model_folder(folder, storage_options, cache_dir)

    return PaintModel.from_pretrained(local(spec), device=device, dtype=dtype, prompt_checker=local(prompt_safety),
                                      image_checker=local(image_safety),
                                      reranker=local(reranker) if rerank > 0 else None,
                                      rerank_candidates=rerank or None, compile=compile)


class PaintStage(ModelStage):
    name = "paint"
    job = "paint"
    requires = (
        Column(C.KEY, "image key <prompt key>-<index>"),
        Column(PROMPT, "prompt text"),
        Column(NEGATIVE_COLUMN, "negative prompt (null: none)"),
        Column(SEED_COLUMN, "the image's seed"),
        Column(C.STATUS, "'ok' rows are rendered, 'error' rows pass through"),
        Column(C.ERROR, "error message of failed rows"),
    )
    produces = (Column(IMAGE_BYTES, "encoded image (null: blocked/error)"),
                *(Column(f.name, "paint setting/result") for f in (*SETTINGS_FIELDS, *PAINT_RESULT_FIELDS)))

    def __init__(self, model: str, sampling: Mapping[str, Any], use_gpu: bool = False, dtype: str | None = None,
                 model_label: str | None = None, image_format: str = "png",
                 storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None,
                 model_batch_size: int = 8, torch_threads: int | None = None, prompt_safety: str | None = None,
                 image_safety: str | None = None, reranker: str | None = None, rerank: int = 0,
                 compile: bool = False) -> None:
        from viscpm import SamplingConfig

        self.model_spec, self.dtype = model, dtype
        self.storage_options, self.cache_dir = storage_options, cache_dir
        self.components = {"prompt_safety": prompt_safety, "image_safety": image_safety, "reranker": reranker,
                           "rerank": rerank, "compile": compile}
        self.sampling = SamplingConfig(**dict(sampling))
        self.image_format = image_format
        super().__init__(use_gpu, torch_threads, max(1, model_batch_size), model_label or model)
        self._encoder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")
        size = self.model.config.default_size
        self.height, self.width = self.sampling.height or size, self.sampling.width or size

    def load_model(self) -> Any:
        return load_paint_model(self.model_spec, device=self.device, dtype=self.dtype,
                                storage_options=self.storage_options, cache_dir=self.cache_dir, **self.components)

    def model_inputs(self, batch: pa.Table, rows: list[int]) -> tuple[list[Any], ...]:
        return tuple([batch.column(name)[i].as_py() for i in rows] for name in (PROMPT, NEGATIVE_COLUMN, SEED_COLUMN))

    def call_model(self, prompts: list[str], negatives: list[str | None], seeds: list[int]) -> list[Any]:
        # one prompt per row with its own seed: an image depends only on (prompt, negative, seed, settings)
        return self.model.generate(prompts, negatives, seeds=seeds, sampling=self.sampling, images_per_prompt=1,
                                   output="np", batch_size=self.model_batch_size)

    def _encode(self, image: Any) -> tuple[bytes | None, Exception | None]:
        try:
            return encode_image(image, self.image_format), None
        except Exception as exc:  # noqa: BLE001  (one bad image is one error row)
            return None, exc

    def result_columns(self, results: list[Any], status: list[str], errors: list[str | None]) -> dict[str, pa.Array]:
        n = len(results)
        images: list[bytes | None] = [None] * n
        values: dict[str, list[Any]] = {f.name: [None] * n for f in PAINT_RESULT_FIELDS}
        for i, result in enumerate(results):
            if result is None:
                continue
            for f in PAINT_RESULT_FIELDS:
                values[f.name][i] = getattr(result, f.name)
            if result.prompt_flagged:
                status[i] = BLOCKED
                continue
        # PNG/WebP encoding (~50 ms per 512x512 image) on a few threads: zlib releases the GIL, so the batch's
        # images encode in parallel instead of one after another between two GPU batches
        todo = [i for i, r in enumerate(results) if r is not None and not r.prompt_flagged]
        for i, (data, exc) in zip(todo, self._encoder.map(self._encode, [results[i].image for i in todo])):
            if exc is None:
                images[i] = data
            else:
                status[i], errors[i] = C.STATUS_ERROR, error_text("encode", exc)
        metrics.count(metrics.IMAGES_RENDERED, sum(image is not None for image in images), job=self.job)
        settings = {"steps": self.sampling.num_inference_steps, "guidance_scale": float(self.sampling.guidance_scale),
                    "scheduler": JOB_SCHEDULER[self.sampling.scheduler], "size": f"{self.width}x{self.height}",
                    "width": self.width, "height": self.height, "model": self.model_label,
                    "image_format": self.image_format}
        columns: dict[str, pa.Array] = {IMAGE_BYTES: pa.array(images, pa.binary())}
        for f in SETTINGS_FIELDS:
            columns[f.name] = pa.array([settings[f.name]] * n, f.type)
        for f in PAINT_RESULT_FIELDS:
            columns[f.name] = pa.array(values[f.name], f.type)
        return columns

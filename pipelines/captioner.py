"""Caption stage (actor pool): the model is loaded once per actor, then answers batch after batch.

Device: an actor that Ray gave GPUs (`num_gpus > 0`; Ray sets CUDA_VISIBLE_DEVICES, so `cuda` is the actor's own
GPU) runs on `cuda` in bf16; otherwise on CPU in fp32. A batch the model fails on is retried row by row, so one bad
row becomes one error row instead of failing its neighbours (or the job).

Each output row also carries bookkeeping columns (`__actor`, `__gpu_ids`, `__model_s`, ...) that the writer folds
into per-actor stats - that is how `_summary.json` knows which GPU each actor had and how busy it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from . import schema as S
from .actors import ModelClock, ModelStage
from .decode import pixels_to_image
from .models import load_caption_model
from .stages import Column

logger = logging.getLogger(__name__)


class CaptionStage(ModelStage):
    name = "caption"
    requires = (
        Column(S.KEY, "row id"),
        Column(S.QUESTION, "question to ask"),
        Column(S.STATUS, "'ok' rows are captioned, 'error' rows pass through"),
        Column(S.ERROR, "error message of failed rows"),
        Column(S.PIXELS, "RGB uint8 bytes from the decode stage"),
        Column(S.WIDTH, "pixel width"),
        Column(S.HEIGHT, "pixel height"),
    )
    produces = (
        Column(S.CAPTION, "the answer (null on error)"),
        Column(S.MODEL, "model name"),
        Column(S.FINISHED, "answer ended by itself"),
        *(Column(name, "generation setting") for name, _ in S.GENERATION_FIELDS),
    )

    def __init__(self, model: str, generation: Mapping[str, Any], use_gpu: bool = False, dtype: str | None = None,
                 model_label: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, model_batch_size: int | None = None,
                 torch_threads: int | None = None) -> None:

        from viscpm import GenerationConfig

        self.place(use_gpu, torch_threads)
        started = time.monotonic()
        self.model = load_caption_model(model, device=self.device, dtype=dtype, storage_options=storage_options,
                                        cache_dir=cache_dir)
        self.generation = GenerationConfig(**dict(generation))
        self.model_label = model_label or getattr(self.model, "name", model)
        self.model_batch_size = model_batch_size  # None: the whole call at once
        logger.info("caption actor %s: model %s on %s (GPUs %s) loaded in %.1f s", self.actor_id, model,
                    self.device, self.gpu_ids or "-", time.monotonic() - started)

    def _generate(self, images: list[Any], questions: list[str]) -> list[tuple[Any, str | None]]:
        """(result, None) or (None, error message) per row."""
        return self.call_isolated(lambda ims, qs: self.model.generate(ims, qs, generation=self.generation),
                                  images, questions)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        n = batch.num_rows
        status = batch.column(S.STATUS).to_pylist()
        errors = batch.column(S.ERROR).to_pylist()
        questions = batch.column(S.QUESTION).to_pylist()
        pixels = batch.column(S.PIXELS)
        widths = batch.column(S.WIDTH).to_pylist()
        heights = batch.column(S.HEIGHT).to_pylist()
        todo = [i for i in range(n) if status[i] == S.STATUS_OK]
        captions: list[str | None] = [None] * n
        finished: list[bool | None] = [None] * n
        clock = ModelClock(n)
        step = self.model_batch_size or max(1, len(todo))
        for c in range(0, len(todo), step):
            chunk = todo[c:c + step]
            images = [pixels_to_image(pixels[i].as_py(), widths[i], heights[i]) for i in chunk]
            t0 = time.time()
            outcomes = self._generate(images, [questions[i] for i in chunk])
            t1 = time.time()
            clock.record(chunk, t0, t1)
            for i, (result, error) in zip(chunk, outcomes, strict=True):
                if error is None:
                    captions[i], finished[i] = result.text, bool(result.finished)
                else:
                    status[i], errors[i] = S.STATUS_ERROR, error
        out = batch.drop_columns([S.PIXELS, S.WIDTH, S.HEIGHT])
        out = out.set_column(out.schema.get_field_index(S.STATUS), S.STATUS, pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index(S.ERROR), S.ERROR, pa.array(errors, pa.string()))
        columns: dict[str, pa.Array] = {
            S.CAPTION: pa.array(captions, pa.string()),
            S.MODEL: pa.array([self.model_label] * n, pa.string()),
            S.FINISHED: pa.array(finished, pa.bool_()),
        }
        used = self.generation.used_settings()  # null for settings the strategy ignores
        for name, typ in S.GENERATION_FIELDS:
            columns[name] = pa.array([used[name]] * n, typ)
        columns.update(self.bookkeeping_columns(clock))
        for name, array in columns.items():
            out = out.append_column(name, array)
        return out

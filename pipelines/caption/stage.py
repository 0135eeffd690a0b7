"""Caption stage (actor pool): VisCPM-Chat loaded once per actor, then answers batch after batch.

Device: an actor that Ray gave GPUs (`num_gpus > 0`; Ray sets CUDA_VISIBLE_DEVICES, so `cuda` is the actor's own
GPU) runs on `cuda` in bf16; otherwise on CPU in fp32. Rows, errors and bookkeeping: `core.model_stage`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..core import metrics
from ..core.model_cache import local_model_folder, read_model_config
from ..core.model_stage import ModelStage
from ..core.stage import Column
from ..core.storage import is_remote
from . import schema as S
from .decode import pixels_to_image

logger = logging.getLogger(__name__)


def load_caption_model(spec: str, device: str = "cpu", dtype: str | None = None,
                       storage_options: Mapping[str, Any] | None = None,
                       cache_dir: str | Path | None = None, image_safety: str | None = None,
                       compile: bool = False) -> Any:
    """`tiny` | local folder | s3:// prefix (downloaded once per node) -> a `viscpm.ChatModel`; `image_safety`: the
    image safety checker's folder (local or s3://, fetched the same way), or None for none; `compile`: compile the
    decode step (torch.compile)."""
    from viscpm import ChatModel

    return ChatModel.from_pretrained(local_model_folder(spec, storage_options, cache_dir), device=device, dtype=dtype,
                                     image_checker=local_model_folder(image_safety, storage_options, cache_dir),
                                     compile=compile)


def _flag(result: Any) -> bool | None:
    flag = getattr(result, "image_flagged", None)  # None: no checker loaded (or a stand-in model's result)
    return None if flag is None else bool(flag)


class CaptionStage(ModelStage):
    name = "caption"
    job = "caption"
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
        Column(S.IMAGE_FLAGGED, "image safety checker's verdict (null: no checker)"),
        *(Column(name, "generation setting") for name, _ in S.GENERATION_FIELDS),
    )
    consumed = (S.PIXELS, S.WIDTH, S.HEIGHT)

    def __init__(self, model: str, generation: Mapping[str, Any], use_gpu: bool = False, dtype: str | None = None,
                 model_label: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, model_batch_size: int | None = None,
                 torch_threads: int | None = None, image_safety: str | None = None, compile: bool = False) -> None:
        from viscpm import GenerationConfig

        self.model_spec, self.dtype, self.image_safety, self.compile = model, dtype, image_safety, compile
        self.storage_options, self.cache_dir = storage_options, cache_dir
        self.generation = GenerationConfig(**dict(generation))
        super().__init__(use_gpu, torch_threads, model_batch_size, model_label or model)

    @classmethod
    def input_image_size(cls, model: str, storage_options: Mapping[str, Any] | None = None) -> int | None:
        """The (size, size) the model resizes every image to, read on the driver without loading it (`tiny`,
        `shapes`, a local folder, an s3:// prefix's viscpm_config.json), so that the decode tasks can resize instead:
        the same pixels, a fraction of the bytes. None when it cannot be known: the decode tasks then ship the
        thumbnail and the model resizes, as it always can."""
        from viscpm import ChatConfig, chat_image_size

        try:
            if is_remote(model):
                return ChatConfig.from_saved(read_model_config(model, storage_options)).image_size
            return chat_image_size(model)
        except Exception as exc:  # noqa: BLE001 - an optimisation only: any doubt keeps the actor resizing
            logger.warning("input image size of model %s unknown (%s: %s): the decode tasks ship thumbnails",
                           model, type(exc).__name__, exc)
            return None

    def load_model(self) -> Any:
        return load_caption_model(self.model_spec, device=self.device, dtype=self.dtype,
                                  storage_options=self.storage_options, cache_dir=self.cache_dir,
                                  image_safety=self.image_safety, compile=self.compile)

    def model_inputs(self, batch: pa.Table, rows: list[int]) -> tuple[list[Any], ...]:
        pixels, widths, heights = batch.column(S.PIXELS), batch.column(S.WIDTH), batch.column(S.HEIGHT)
        images = [pixels_to_image(pixels[i].as_py(), widths[i].as_py(), heights[i].as_py()) for i in rows]
        questions = batch.column(S.QUESTION)
        return images, [questions[i].as_py() for i in rows]

    def prepare(self, images: list[Any], questions: list[str]) -> tuple[Any, ...]:
        # resize + normalise + tokenise on the caller's thread: overlaps the other batch's generation
        return (self.model.prepare(images, questions),)

    def call_model(self, batch: Any) -> list[Any]:
        return self.model.generate_batch(batch, self.generation)

    def result_columns(self, results: list[Any], status: list[str], errors: list[str | None]) -> dict[str, pa.Array]:
        n = len(results)
        # one update per actor call (stand-in models' results carry no token ids)
        metrics.count(metrics.GENERATED_TOKENS, sum(len(getattr(r, "token_ids", ()) or ()) for r in results
                                                    if r is not None), job=self.job)
        columns: dict[str, pa.Array] = {
            S.CAPTION: pa.array([r.text if r is not None else None for r in results], pa.string()),
            S.MODEL: pa.array([self.model_label] * n, pa.string()),
            S.FINISHED: pa.array([bool(r.finished) if r is not None else None for r in results], pa.bool_()),
            S.IMAGE_FLAGGED: pa.array([_flag(r) for r in results], pa.bool_()),
        }
        used = self.generation.used_settings()  # null for settings the strategy ignores
        for name, typ in S.GENERATION_FIELDS:
            columns[name] = pa.array([used[name]] * n, typ)
        return columns

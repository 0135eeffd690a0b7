"""What the model stages (caption, paint) have in common: an actor placed on a GPU or the CPU, model calls that
isolate a failing row, and the per-row bookkeeping columns (`__actor`, `__model_s`, ...) the write stage folds into
per-actor stats for `_summary.json`."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from . import schema as S
from .decode import error_text
from .stages import Stage

logger = logging.getLogger(__name__)


def ray_placement() -> tuple[str, list[str]]:
    """(actor id, GPU ids Ray assigned) - ('local', []) outside Ray, e.g. in a unit test or the bare loop."""
    try:
        import ray

        if ray.is_initialized():
            actor = ray.get_runtime_context().get_actor_id() or "driver"
            return actor, [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - placement info is best effort
        logger.debug("no Ray placement info", exc_info=True)
    return "local", []


def actor_device(use_gpu: bool, torch_threads: int | None, who: str, gpu_ids: list[str]) -> str:
    """`cuda` for an actor Ray gave GPUs (CUDA_VISIBLE_DEVICES makes it the actor's own), else `cpu`."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return "cuda"
    if use_gpu:
        logger.warning("%s was given GPUs %s but CUDA is not available: running on CPU", who, gpu_ids)
    if torch_threads:
        # Ray sets OMP_NUM_THREADS to the actor's CPU request (1): a CPU model would use one core only
        torch.set_num_threads(torch_threads)
    return "cpu"


class ModelClock:
    """Per row of a batch: its share of the seconds of the model call it was in, and that call's start and end
    (None: the row never reached the model, e.g. an error row passed through)."""

    def __init__(self, n: int) -> None:
        self.seconds: list[float] = [0.0] * n
        self.starts: list[float | None] = [None] * n
        self.ends: list[float | None] = [None] * n

    def record(self, rows: Sequence[int], start: float, end: float) -> None:
        for i in rows:
            self.seconds[i], self.starts[i], self.ends[i] = (end - start) / len(rows), start, end


class ModelStage(Stage):
    """Base of the actor stages that hold a model: placement, row-isolating calls, bookkeeping columns."""

    def place(self, use_gpu: bool, torch_threads: int | None) -> None:
        """Set `actor_id`, `gpu_ids`, `node`, `device` (call first in `__init__`)."""
        self.actor_id, self.gpu_ids = ray_placement()
        self.node = socket.gethostname()
        self.device = actor_device(use_gpu, torch_threads, f"{self.name} actor {self.actor_id}", self.gpu_ids)

    def call_isolated(self, call: Callable[..., list[Any]], *columns: list[Any]) -> list[tuple[Any, str | None]]:
        """`call(*columns)` -> one result per row, as (result, None); if the call fails on several rows they are
        retried one by one, so a bad row becomes (None, error message) without taking its neighbours down."""
        rows = len(columns[0])
        try:
            results = call(*columns)
            if len(results) != rows:
                raise RuntimeError(f"model returned {len(results)} results for {rows} rows")
            return [(r, None) for r in results]
        except Exception as exc:  # noqa: BLE001 - isolate the bad row(s) below
            if rows == 1:
                return [(None, error_text(self.name, exc))]
            logger.warning("%s batch of %d failed (%s: %s); retrying row by row", self.name, rows,
                           type(exc).__name__, exc)
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()  # an out-of-memory batch leaves its blocks cached
            return [self.call_isolated(call, *([c[i]] for c in columns))[0] for i in range(rows)]

    def bookkeeping_columns(self, clock: ModelClock) -> dict[str, pa.Array]:
        n = len(clock.seconds)
        return {
            S.ACTOR: pa.array([self.actor_id] * n, pa.string()),
            S.NODE: pa.array([self.node] * n, pa.string()),
            S.DEVICE: pa.array([self.device] * n, pa.string()),
            S.GPU_IDS: pa.array([",".join(self.gpu_ids)] * n, pa.string()),
            S.MODEL_SECONDS: pa.array(clock.seconds, pa.float64()),
            S.BATCH_START: pa.array(clock.starts, pa.float64()),
            S.BATCH_END: pa.array(clock.ends, pa.float64()),
        }

"""The model stages' shared actor: placed on a GPU or the CPU, loads its model once, then for every batch runs the
rows whose status is `ok` through the model in chunks of `model_batch_size`, isolates a failing row (the batch is
retried row by row, so one bad row becomes one error row), and adds the bookkeeping columns (`__actor`,
`__model_s`, ...) the write stage folds into per-actor stats for `_summary.json`.

A job's stage only says how to load its model, which columns feed it, what host work prepares a call, how to call
it, and which columns its results become (`load_model`, `model_inputs`, `prepare`, `call_model`, `result_columns`).

Two batches per actor: Ray runs two calls of an actor at once (`CALLS_PER_ACTOR` threads). Only `call_model` runs on
the actor's one device thread, so one batch's host work (column extraction, `prepare`: image preprocessing,
tokenising; the result columns: e.g. PNG encoding) runs while the other batch is on the device, and the device
still sees one model call at a time (no second batch's activations in GPU memory). One thread for every model call
also keeps torch's per-thread state single: CUDA graphs of a compiled model are recorded once, not per Ray thread.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from . import columns as C
from . import metrics
from .stage import Stage, error_text

logger = logging.getLogger(__name__)

CALLS_PER_ACTOR = 2  # one batch on the device, the next being prepared


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
    """Base of the actor stages that hold a model. Subclasses set `name`, `requires`, `produces`, `consumed`
    (input columns the output drops) and implement the four methods below."""

    consumed: tuple[str, ...] = ()
    job: str = "model"  # the `job` tag of its metrics (caption | paint)

    def __init__(self, use_gpu: bool, torch_threads: int | None, model_batch_size: int | None,
                 model_label: str) -> None:
        self.actor_id, self.gpu_ids = ray_placement()
        self.node = socket.gethostname()
        self.device = actor_device(use_gpu, torch_threads, f"{self.name} actor {self.actor_id}", self.gpu_ids)
        self.model_batch_size = model_batch_size  # None: all of a call's rows at once
        self.model_label = model_label
        # every model call on this one thread: one at a time, whatever the number of Ray calls in flight
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        started = time.monotonic()
        self.model = self.load_model()
        load_s = time.monotonic() - started
        metrics.observe(metrics.MODEL_LOAD_SECONDS, load_s, job=self.job)
        logger.info("%s actor %s: model %s on %s (GPUs %s) loaded in %.1f s", self.name, self.actor_id,
                    model_label, self.device, self.gpu_ids or "-", load_s)

    # ---- what a job's stage says -----------------------------------------------------------------------------
    def load_model(self) -> Any:
        """The model, on `self.device` (called once, in the actor)."""
        raise NotImplementedError

    def model_inputs(self, batch: pa.Table, rows: list[int]) -> tuple[list[Any], ...]:
        """The model's per-row input lists for these rows of the batch."""
        raise NotImplementedError

    def prepare(self, *inputs: list[Any]) -> tuple[Any, ...]:
        """Host work for one model call, run on the caller's thread (it overlaps the other call's device work);
        returns `call_model`'s arguments. Default: the per-row input lists as they are."""
        return inputs

    def call_model(self, *inputs: Any) -> list[Any]:
        """One result per row (runs on the device thread)."""
        raise NotImplementedError

    def result_columns(self, results: list[Any], status: list[str], errors: list[str | None]) -> dict[str, pa.Array]:
        """The output columns from one result per row (None where the row did not reach the model or failed);
        may turn rows into other statuses (`status`/`errors` are updated in place)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        n = batch.num_rows
        status = batch.column(C.STATUS).to_pylist()
        errors = batch.column(C.ERROR).to_pylist()
        todo = [i for i in range(n) if status[i] == C.STATUS_OK]
        results: list[Any] = [None] * n
        clock = ModelClock(n)
        step = self.model_batch_size or max(1, len(todo))
        for c in range(0, len(todo), step):
            chunk = todo[c:c + step]
            inputs = self.model_inputs(batch, chunk)
            times: list[float] = []  # device time only: waiting for the device thread or preparing is not the model's
            outcomes = self.call_isolated(self._prepare_and_call(times), *inputs)
            t0, t1 = (times[0], times[-1]) if times else (time.time(),) * 2  # no call: every row failed to prepare
            clock.record(chunk, t0, t1)
            metrics.model_call(self.job, t1 - t0, len(chunk))  # one update per model call, never per row
            for i, (result, error) in zip(chunk, outcomes, strict=True):
                if error is None:
                    results[i] = result
                else:
                    status[i], errors[i] = C.STATUS_ERROR, error
        columns = self.result_columns(results, status, errors)
        out = batch.drop_columns([c for c in self.consumed if c in batch.column_names])
        out = out.set_column(out.schema.get_field_index(C.STATUS), C.STATUS, pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index(C.ERROR), C.ERROR, pa.array(errors, pa.string()))
        for name, array in {**columns, **self.bookkeeping_columns(clock)}.items():
            out = out.append_column(name, array)
        return out

    def _prepare_and_call(self, times: list[float]) -> Callable[..., list[Any]]:
        """`prepare` here, `call_model` on the device thread; the start/end of every model call go to `times`."""

        def on_device(prepared: tuple[Any, ...]) -> list[Any]:
            times.append(time.time())
            try:
                return self.call_model(*prepared)
            finally:
                times.append(time.time())

        def run(*inputs: list[Any]) -> list[Any]:
            return self.device_thread.submit(on_device, self.prepare(*inputs)).result()

        return run

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
            C.ACTOR: pa.array([self.actor_id] * n, pa.string()),
            C.NODE: pa.array([self.node] * n, pa.string()),
            C.DEVICE: pa.array([self.device] * n, pa.string()),
            C.GPU_IDS: pa.array([",".join(self.gpu_ids)] * n, pa.string()),
            C.MODEL_SECONDS: pa.array(clock.seconds, pa.float64()),
            C.BATCH_START: pa.array(clock.starts, pa.float64()),
            C.BATCH_END: pa.array(clock.ends, pa.float64()),
        }

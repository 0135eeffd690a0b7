"""The caption job, wired: config -> plan -> lazy Ray Dataset -> streamed execution -> clean-up -> reconciliation.

    read (Ray read_*) -> normalize -> resume-filter -> decode (CPU tasks, autoscaled)
        -> caption (fixed actor pool, `num_gpus` each) -> write (tasks: one file + checkpoint per batch)

The driver only consumes one small stats row per written file (streaming: nothing is materialised), logs
progress, and at the end reads the ids of the output's data files back to reconcile them with the input's.
Expects Ray to be initialised by the caller (`jobs/caption.py`); this module configures no logging.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import schema as S
from .captioner import CaptionStage
from .config import CaptionJobConfig
from .decode import DecodeStage
from .readers import InputPlan, KeyFilter, normalize_stage, plan_input, read_dataset
from .resume import OutputStore, Reconciliation, reconcile
from .storage import locate, resolve_storage_options
from .writers import WriteStage, merge_actor_stats

logger = logging.getLogger(__name__)


@dataclass
class Resources:
    """What each stage asks Ray for."""

    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    decode_cpus: float = 1.0
    write_cpus: float = 0.25

    @classmethod
    def decide(cls, config: CaptionJobConfig, cluster: dict[str, float]) -> "Resources":
        gpus = config.num_gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
        cpus = config.cpus_per_worker
        if cpus is None:
            # GPU actors: 0 CPUs - in Ray 2.60 they would otherwise hold 1 CPU each, and on a small node the pool
            # can take every CPU and starve the read/decode tasks (deadlock). CPU actors: up to 1 CPU each, but
            # always leaving 2 CPUs free - one for a read task, one for a decode task. With only one left, a read
            # task streaming a whole file holds it while decode waits: measured on 2 CPUs, the read output piled
            # up in the object store (memory grew with the input) and the job ran 2x slower.
            total = cluster.get("CPU", 1.0)
            cpus = 0.0 if gpus > 0 else max(0.0, min(1.0, (total - 2.0) / config.num_workers))
        # writes are I/O: a small CPU share, so they never wait long for a free CPU
        return cls(config.num_workers, float(gpus), float(cpus))


@dataclass
class CaptionJobResult:
    output: str
    run: int
    input_rows: int
    skipped: int  # ids already done before this run
    processed: int  # rows written by this run
    ok: int  # this run
    error: int  # this run
    elapsed_s: float
    pipeline_s: float
    reconciliation: Reconciliation
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    files_written: int = 0

    @property
    def succeeded(self) -> bool:
        return self.reconciliation.ok

    @property
    def images_per_s(self) -> float:
        return self.processed / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def one_line(self) -> str:
        r = self.reconciliation
        head = "caption job done" if self.succeeded else "caption job FAILED reconciliation"
        return (f"{head}: {self.processed} rows this run ({self.ok} ok, {self.error} error), {self.skipped} already "
                f"done; output {r.output_rows}/{r.input_rows} ids ({r.ok_rows} ok, {r.error_rows} error); "
                f"{self.elapsed_s:.1f} s, {self.images_per_s:.1f} images/s -> {self.output}")

    def to_summary(self, config: CaptionJobConfig) -> dict[str, Any]:
        return {"succeeded": self.succeeded, "run": self.run, "output": self.output,
                "input_rows": self.input_rows, "skipped_already_done": self.skipped,
                "processed_this_run": self.processed, "ok_this_run": self.ok, "error_this_run": self.error,
                "files_written_this_run": self.files_written, "elapsed_s": round(self.elapsed_s, 3),
                "pipeline_s": round(self.pipeline_s, 3), "images_per_s": round(self.images_per_s, 3),
                "reconciliation": self.reconciliation.to_dict(), "problems": self.reconciliation.problems(),
                "actors": self.actors, "config": config.public_dict()}


def _configure_data_context(config: CaptionJobConfig) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = config.no_progress_timeout_s
    ctx.wait_for_min_actors_s = config.actor_start_timeout_s
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # Ray 2.60's new Parquet read path packs small files into one read task (no read parallelism), starts a
        # footer-reader actor per file (~100 MB each: peak memory grew with the file count) and once lost rows
        # silently on node loss (../shared/NOTES-ray.md). The classic path: one read task per file. Set
        # RAY_DATA_USE_DATASOURCE_V2=1 to choose the new one anyway.
        ctx.use_datasource_v2 = False


def build_pipeline(plan: InputPlan, config: CaptionJobConfig, storage_options: dict[str, Any], store: OutputStore,
                   run: int, todo: pa.Array | None, resources: Resources) -> Any:
    """The lazy Dataset from input to written-file stats. `todo`: only these keys (None: all)."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = read_dataset(plan, config)
    ds = ds.map_batches(normalize_stage(plan, config), batch_format="pyarrow", batch_size=None)
    if todo is not None:
        # ship the smaller of the two sets; both select the same rows
        keep = len(todo) <= len(plan.keys) - len(todo)
        keys = todo if keep else pc.filter(plan.keys, pc.invert(pc.is_in(plan.keys, value_set=todo)))
        ds = ds.map_batches(KeyFilter(ray.put(keys), keep=keep), batch_format="pyarrow", batch_size=None)
    # Small blocks are what spreads rows over decode tasks and caption actors: Ray hands an actor whole blocks,
    # and one Parquet file or shard can arrive as a single block of thousands of rows
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size)
    # max_calls=0 is Ray's default for tasks (workers are reused); it is spelled out because differing remote args
    # also keep Ray Data from fusing decode into a CPU caption actor whose CPU request happens to be equal -
    # decode must stay autoscaled tasks running beside the actors, not inside them
    ds = ds.map_batches(DecodeStage(config.max_image_side, config.max_image_pixels, plan.root.uri, storage_options),
                        batch_format="pyarrow", batch_size=config.decode_batch_size, num_cpus=resources.decode_cpus,
                        max_calls=0)
    ds = ds.map_batches(
        CaptionStage, fn_constructor_kwargs={
            "model": config.model, "generation": config.generation_kwargs(),
            "use_gpu": resources.gpus_per_worker > 0, "model_label": config.model,
            "storage_options": storage_options, "cache_dir": config.model_cache_dir,
            "model_batch_size": config.batch_size,
            "torch_threads": config.torch_threads},
        # one call per block: Ray's per-call overhead is paid once per block, not once per model batch
        batch_format="pyarrow", batch_size=max(config.batch_size, config.decode_batch_size),
        compute=ActorPoolStrategy(size=resources.num_workers),
        num_gpus=resources.gpus_per_worker or None, num_cpus=resources.cpus_per_worker)
    schema = S.output_schema(plan.keep_fields)
    return ds.map_batches(WriteStage(store.location, run, config.output_format, schema), batch_format="pyarrow",
                          batch_size=config.rows_per_file, num_cpus=resources.write_cpus)


def run_caption_job(config: CaptionJobConfig) -> CaptionJobResult:
    """Run (or resume) one caption job; returns its result - `succeeded` is False when reconciliation failed.
    Raises InputError / OutputConflictError / ValueError before any work for bad inputs or outputs."""
    import ray

    started = time.monotonic()
    config.validate()
    storage_options = resolve_storage_options(config.storage_options)
    plan = plan_input(config, storage_options)  # before touching the output: a bad input changes nothing
    store = OutputStore(locate(config.output, storage_options), config.output_format)
    run = store.start_run(config.fingerprint(), "retry-errors" if config.retry_errors else "normal",
                          overwrite=config.overwrite)
    store.clean_incomplete()
    store.resolve_duplicates(run)

    state = store.checkpoint_index()
    done = state if not config.retry_errors else state.filter(pc.equal(state[S.STATUS], S.STATUS_OK))
    done_in_input = pc.is_in(plan.keys, value_set=done[S.KEY]) if done.num_rows else None
    todo = plan.keys if done_in_input is None else pc.filter(plan.keys, pc.invert(done_in_input))
    skipped = len(plan.keys) - len(todo)
    logger.info("run %d (%s): %d ids in the input, %d already done, %d to process", run,
                "retry-errors" if config.retry_errors else "normal", len(plan.keys), skipped, len(todo))

    processed = ok = error = files = 0
    actors: dict[str, dict[str, Any]] = {}
    pipeline_started = time.monotonic()
    if len(todo):
        _configure_data_context(config)
        resources = Resources.decide(config, ray.cluster_resources())
        logger.info("resources: %d caption actors x (%g GPU, %g CPU); decode tasks %g CPU", resources.num_workers,
                    resources.gpus_per_worker, resources.cpus_per_worker, resources.decode_cpus)
        ds = build_pipeline(plan, config, storage_options, store, run, None if skipped == 0 else todo, resources)
        last_log = time.monotonic()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for row in batch.to_pylist():
                processed += row["rows"]
                ok += row["ok"]
                error += row["error"]
                files += 1
                merge_actor_stats(actors, json.loads(row["actors"]))
            if time.monotonic() - last_log >= config.progress_every_s:
                last_log = time.monotonic()
                rate = processed / max(1e-9, last_log - pipeline_started)
                logger.info("progress: %d/%d rows (%d ok, %d error), %.1f images/s", processed, len(todo), ok, error,
                            rate)
    pipeline_s = time.monotonic() - pipeline_started

    store.resolve_duplicates(run)  # a --retry-errors run supersedes the old error rows here
    recon = reconcile(plan.keys, store.data_index())
    result = CaptionJobResult(output=store.location.uri, run=run, input_rows=len(plan.keys), skipped=skipped,
                              processed=processed, ok=ok, error=error, elapsed_s=time.monotonic() - started,
                              pipeline_s=pipeline_s, reconciliation=recon, actors=actors, files_written=files)
    for problem in recon.problems():
        logger.error("reconciliation: %s", problem)
    store.finish_run(run, result.succeeded, result.to_summary(config))
    return result

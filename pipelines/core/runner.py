"""The run skeleton the caption and paint jobs share (`run_job`): decide the resources, open a run on the output
store, stream the pipeline (`execute`: consume the write stats rows - nothing is materialised - and log progress),
reconcile, write `_summary.json`; and turn a cluster that cannot start the actors into a clear message.

Each job only plans its input, builds its Dataset and names its units; the exactly-once logic lives in the output
store (`core.output`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from . import columns as S
from . import metrics, stop
from .inputs import skipped_files_text
from .model_cache import check_model_folders
from .output import OutputConflictError, OutputStore, Reconciliation, RunStart, merge_actor_stats
from .progress import RowProgress, format_statuses  # noqa: F401 - format_statuses: re-exported
from .storage import Location, canonical_uri, locate, resolve_storage_options

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
    def decide(cls, config: Any, cluster: dict[str, float]) -> "Resources":
        """From a job config's `num_workers`, `num_gpus_per_worker`, `cpus_per_worker` and the cluster's totals."""
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


ACTOR_LOAD_WAIT_S = 1800.0  # default actor start timeout when the cluster has what the actors ask for
NODE_JOIN_WAIT_S = 600.0  # ... and when it has not (yet): an autoscaler must add nodes first


class ClusterResourcesError(RuntimeError):
    """The cluster can never start the model actors as configured (refused before any work)."""


class JobFailed(RuntimeError):
    """The run stopped for a reason the message explains fully (no traceback needed)."""


def cluster_can_grow() -> bool:
    """False when this process started its Ray itself (`ray.init()` without a cluster): nothing adds nodes to it.
    A cluster the driver joined (`ray start`, `ray job submit`, KubeRay) may autoscale."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # Ray has no public flag for this
    return not getattr(node, "ray_init_cluster", False)


def actor_start_wait(config: Any, resources: "Resources", cluster: dict[str, float], job: str) -> float:
    """Seconds to wait for the model actors to start; raises ClusterResourcesError when they never can."""
    short = resources.gpus_per_worker > cluster.get("GPU", 0.0)
    if short and not cluster_can_grow():
        raise ClusterResourcesError(
            f"each {job} actor asks for {resources.gpus_per_worker:g} GPU (--num-gpus-per-worker) but this local Ray "
            f"has {cluster.get('GPU', 0.0):g} GPUs and cannot get more. To run on the CPU, pass "
            "--num-gpus-per-worker 0 (or drop num_gpus_per_worker from the YAML: GPUs are used when present); on "
            "a machine with GPUs, start Ray with them (--num-gpus N) or join a cluster (--ray-address).")
    if config.actor_start_timeout_s is not None:
        return float(config.actor_start_timeout_s)
    return NODE_JOIN_WAIT_S if short else ACTOR_LOAD_WAIT_S


def configure_data_context(config: Any, actor_wait_s: float) -> None:
    """Ray Data settings of a job run (its `no_progress_timeout_s` and the actor start wait)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = config.no_progress_timeout_s
    ctx.wait_for_min_actors_s = actor_wait_s
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # Ray 2.60's new Parquet read path packs small files into one read task (no read parallelism), starts a
        # footer-reader actor per file (~100 MB each: peak memory grew with the file count) and, in 1 of 12 of
        # our node-kill runs, reported success with 4,000 of 20,000 rows written (its file-listing helper actor
        # died with the node). The classic path: one read task per file, no rows lost in those runs. Set
        # RAY_DATA_USE_DATASOURCE_V2=1 to choose the new one anyway.
        ctx.use_datasource_v2 = False


@dataclass
class RunCounts:
    """What this run wrote, summed from the write stats rows."""

    processed: int = 0
    statuses: Counter = field(default_factory=Counter)
    files: int = 0
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def execute(ds: Any, total: int, progress_every_s: float, unit: str, job: str = "model",
            bar: bool | None = None) -> RunCounts:
    """Stream a Dataset whose rows are `WriteStage` stats (one per data file) to the end, showing progress in rows
    (`RowProgress`: a bar on a terminal - `bar` None: when stderr is one - else log lines)."""
    counts = RunCounts()
    started = time.monotonic()
    progress = RowProgress(total, unit, progress_every_s, job, bar=bar)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for row in batch.to_pylist():
                statuses = json.loads(row["statuses"])
                counts.processed += row["rows"]
                counts.statuses.update(statuses)
                counts.files += 1
                merge_actor_stats(counts.actors, json.loads(row["actors"]))
                progress.update(row["rows"], statuses)
            stop.check()  # SIGTERM: stop after this written file (see core/stop.py)
    finally:
        progress.close()
    counts.seconds = time.monotonic() - started
    counts.actors = readable_actors(counts.actors, job)
    return counts


def readable_actors(actors: dict[str, dict[str, Any]], job: str) -> dict[str, dict[str, Any]]:
    """Per-actor stats keyed `<job>-<i>` (in the order the actors started working) instead of Ray's 32-hex actor
    ids, which stay inside as `actor_id`; `busy_share` is model time over the actor's first-to-last call."""
    named: dict[str, dict[str, Any]] = {}
    for i, (actor_id, stats) in enumerate(sorted(actors.items(), key=lambda kv: (kv[1]["first_start"], kv[0]))):
        span = stats["last_end"] - stats["first_start"]
        named[f"{job}-{i}"] = {"actor_id": actor_id, **stats,
                               "busy_share": round(stats["model_s"] / span, 4) if span > 0 else None}
    return named


@dataclass
class JobResult:
    """The outcome of one run of a job; `succeeded` is False when reconciliation failed."""

    job: ClassVar[str] = "job"
    unit: ClassVar[str] = "rows"  # what one key is, in messages

    output: str
    run: int
    input_rows: int  # keys in the input
    skipped: int  # keys already done before this run
    processed: int  # rows written by this run
    statuses: dict[str, int]  # this run, by status
    elapsed_s: float
    pipeline_s: float
    reconciliation: Reconciliation
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    files_written: int = 0
    skipped_files: list[str] = field(default_factory=list)  # input files named but not read (another extension)

    @property
    def succeeded(self) -> bool:
        return self.reconciliation.ok

    @property
    def ok(self) -> int:
        return self.statuses.get(S.STATUS_OK, 0)

    @property
    def error(self) -> int:
        return self.statuses.get(S.STATUS_ERROR, 0)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def one_line(self) -> str:
        r = self.reconciliation
        head = f"{self.job} job done" if self.succeeded else f"{self.job} job FAILED reconciliation"
        return (f"{head}: {self.processed} {self.unit} this run ({format_statuses(self.statuses)}), {self.skipped} "
                f"already done; output {r.output_rows}/{r.input_rows} {self.unit} ({format_statuses(r.statuses)}); "
                f"{self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s -> {self.output}"
                f"{'; ' + skipped_files_text(self.skipped_files) if self.skipped_files else ''}")

    def to_summary(self, config: Any) -> dict[str, Any]:
        """`_summary.json`: counts of this run and of the whole output, problems, per-actor stats, the config."""
        return {"succeeded": self.succeeded, "job": self.job, "run": self.run, "output": self.output,
                "input_rows": self.input_rows, "skipped_already_done": self.skipped,
                "processed_this_run": self.processed, "ok_this_run": self.ok, "error_this_run": self.error,
                "statuses_this_run": dict(self.statuses), "files_written_this_run": self.files_written,
                "elapsed_s": round(self.elapsed_s, 3), "pipeline_s": round(self.pipeline_s, 3),
                "images_per_s": round(self.images_per_s, 3), "reconciliation": self.reconciliation.to_dict(),
                "problems": self.reconciliation.problems(), "actors": self.actors, "config": config.public_dict(),
                "skipped_files": list(self.skipped_files)}


def output_inside_input(input_spec: str, output: str) -> str | None:
    """The --input (one of its `::`-joined specs) that --output is, or lies inside, else None. A job's files there
    would be listed as input by its next run (and an output can never be its own input)."""
    out = canonical_uri(output)
    for spec in input_spec.split("::"):
        if not spec or any(ch in spec for ch in "*?[{"):  # a pattern names files, not a folder to write into
            continue
        root = canonical_uri(spec)
        if out == root or out.startswith(root.rstrip("/") + "/"):
            return spec
    return None


def checked_job(config: Any) -> tuple[dict[str, Any], Location]:
    """What every job does first, before it reads its input: validate the config, resolve the storage options,
    check the model folders on the driver; returns (storage options, output location)."""
    config.validate()
    inside = output_inside_input(config.input, config.output)
    if inside is not None:
        raise OutputConflictError(
            f"--output {config.output} is inside --input {inside}: the next run would read this job's own files as "
            "input. Use an --output outside the input folder/prefix.")
    storage_options = resolve_storage_options(config.storage_options)
    check_model_folders(config.model_sources(), storage_options)
    return storage_options, locate(config.output, storage_options)


def _is_actor_start_timeout(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Timed out while starting actors" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class _HideActorStartTimeout(logging.Filter):
    """Ray Data logs an actor-start timeout as an internal error with its whole stack; `run_job` turns it into a
    one-line `JobFailed`, so that log record only repeats it. The records are emitted while Ray Data handles the
    exception, which `sys.exc_info()` then shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not (exc is not None and _is_actor_start_timeout(exc))


def run_job(config: Any, store: OutputStore, keys: pa.Array, build: Callable[[RunStart, Resources], Any],
            result_type: type[JobResult], final_statuses: Sequence[str] = (S.STATUS_OK,),
            started: float | None = None, before_summary: Callable[[JobResult], None] | None = None,
            ray_init: Callable[[], None] | None = None, skipped_files: Sequence[str] = ()) -> JobResult:
    """One run of a job whose input was planned (`keys`) and whose output is `store`: open the run, build and stream
    the Dataset (`build(start, resources)`) if anything is left, reconcile, write `_summary.json`. `skipped_files`:
    the input files the plan named but did not read, reported in the end line and the summary.

    A run that fails before it wrote any data leaves the output as it found it (`OutputStore.abandon_run`)."""
    import ray

    started = time.monotonic() if started is None else started
    # the output's refusals come before Ray starts: seconds, not the minute a local Ray takes
    store.check_compatible(config.fingerprint(), overwrite=config.overwrite)
    if ray_init is not None:
        ray_init()
    cluster = ray.cluster_resources()
    resources = Resources.decide(config, cluster)
    actor_wait = actor_start_wait(config, resources, cluster, result_type.job)  # may refuse: before the output
    before = store.snapshot()
    start = store.open_run(keys, config.fingerprint(), retry_errors=config.retry_errors, overwrite=config.overwrite,
                           final_statuses=final_statuses)
    counts = RunCounts()
    try:
        if len(start.todo):
            configure_data_context(config, actor_wait)
            if resources.gpus_per_worker > cluster.get("GPU", 0.0):
                # an autoscaling cluster (KubeRay) adds GPU nodes on demand
                logger.warning("each %s actor asks for %g GPU but the cluster has %g GPUs now: waiting up to %.0f s "
                               "(--actor-start-timeout-s) for nodes to join. On a machine without GPUs pass "
                               "--num-gpus-per-worker 0 (CPU actors).", result_type.job, resources.gpus_per_worker,
                               cluster.get("GPU", 0.0), actor_wait)
            logger.info("resources: %d %s actors x (%g GPU, %g CPU)", resources.num_workers, result_type.job,
                        resources.gpus_per_worker, resources.cpus_per_worker)
            ray_data_errors = logging.getLogger("ray.data.exceptions")
            hide = _HideActorStartTimeout()
            ray_data_errors.addFilter(hide)
            metrics.set_gauge(metrics.RUN_TODO_ROWS, len(start.todo), job=result_type.job)
            try:
                counts = execute(build(start, resources), len(start.todo), config.progress_every_s,
                                 result_type.unit, result_type.job)
            finally:
                ray_data_errors.removeFilter(hide)
    except BaseException as exc:
        store.abandon_run(start.run, before)
        if _is_actor_start_timeout(exc):
            now = ray.cluster_resources()
            raise JobFailed(
                f"the {resources.num_workers} {result_type.job} actor(s) did not start within {actor_wait:.0f} s "
                f"(--actor-start-timeout-s): each asks for {resources.gpus_per_worker:g} GPU and "
                f"{resources.cpus_per_worker:g} CPU, the cluster has {now.get('GPU', 0.0):g} GPUs and "
                f"{now.get('CPU', 0.0):g} CPUs. Check that nodes of that kind can join (`ray status`), or run on "
                "the CPU with --num-gpus-per-worker 0.") from None
        raise

    recon = store.reconcile(start.run, keys)
    for problem in recon.problems():
        logger.error("reconciliation: %s", problem)
    result = result_type(output=store.location.uri, run=start.run, input_rows=len(keys), skipped=start.skipped,
                         processed=counts.processed, statuses=dict(counts.statuses),
                         elapsed_s=time.monotonic() - started, pipeline_s=counts.seconds, reconciliation=recon,
                         actors=counts.actors, files_written=counts.files, skipped_files=list(skipped_files))
    if before_summary is not None:
        before_summary(result)
    store.finish_run(start.run, result.succeeded, result.to_summary(config))
    metrics.run_ended(result_type.job, result.succeeded)
    if result.succeeded and cluster_can_grow():
        # on a cluster that outlives this driver, stay until the last-success gauge has been exported for a while;
        # a local Ray (and its metrics) ends with the driver anyway
        metrics.linger_for_export()
    return result

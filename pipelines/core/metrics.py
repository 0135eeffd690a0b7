"""The jobs' application metrics, in one place: names (what dashboards and alerts are written against), types,
tags, and small recording helpers the stages and the driver call once per batch / file / run - never per token or
per row, so they cost nothing measurable.

They go through `ray.util.metrics`: Ray's per-node metrics agent exports them to Prometheus with a `ray_` prefix
(`viscpm_rows` -> `ray_viscpm_rows_total`; histograms as `_bucket`/`_sum`/`_count`). Metric objects are made
lazily, once per process, and live in this module: stages never hold (or pickle) them. Outside a Ray worker or
driver (unit tests calling a stage directly) the helpers do nothing. `VISCPM_METRICS=0` in a process's environment
turns them off there (on a cluster: in the job's runtime_env, so workers see it too).

Measured on Ray 2.60: a driver's values are flushed when it exits; a gauge of an exited process stays exported for
one or two report intervals (10 s each by default), counters and histograms stay; a histogram's `_sum` is computed
from bucket midpoints (approximate - use `_bucket` and `_count`, or counters, for exact numbers).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "ray_"  # added by Ray's exporter
ENV_SWITCH = "VISCPM_METRICS"

ROWS = "viscpm_rows"
MODEL_BATCH_SECONDS = "viscpm_model_batch_seconds"
MODEL_BATCH_ROWS = "viscpm_model_batch_rows"
STAGE_ERRORS = "viscpm_stage_errors"
GENERATED_TOKENS = "viscpm_generated_tokens"
IMAGES_RENDERED = "viscpm_images_rendered"
MODEL_LOAD_SECONDS = "viscpm_model_load_seconds"
INPUT_FILES = "viscpm_input_files"
LAST_SUCCESS = "viscpm_last_success_timestamp_seconds"
RUNS = "viscpm_runs"
RUN_TODO_ROWS = "viscpm_run_todo_rows"
FILES_WRITTEN = "viscpm_files_written"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()
    emitted: bool = True  # False: defined for dashboards to come, not recorded yet


SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(ROWS, "counter", "Rows written to the output, by final status (ok | error | blocked).",
               ("job", "status")),
    MetricSpec(MODEL_BATCH_SECONDS, "histogram", "Wall time of each model call, seconds.", ("job",),
               SECONDS_BUCKETS),
    MetricSpec(MODEL_BATCH_ROWS, "histogram", "Rows per model call.", ("job",), ROWS_BUCKETS),
    MetricSpec(STAGE_ERRORS, "counter", "Error rows by the stage that failed them (normalize, read, decode, caption, "
               "input, paint, encode, write).", ("job", "stage")),
    MetricSpec(GENERATED_TOKENS, "counter", "Tokens the caption model generated.", ("job",)),
    MetricSpec(IMAGES_RENDERED, "counter", "Images the paint model rendered and encoded.", ("job",)),
    MetricSpec(MODEL_LOAD_SECONDS, "histogram", "Seconds a model actor took to load its model.", ("job",),
               LOAD_BUCKETS),
    MetricSpec(INPUT_FILES, "counter", "Input files an --incremental run listed, by kind (new | changed | "
               "unchanged | removed).", ("job", "kind")),
    MetricSpec(LAST_SUCCESS, "gauge", "Unix time at which a run ended with every input id in the output.",
               ("job",)),
    MetricSpec(RUNS, "counter", "Runs that reached reconciliation, by outcome (succeeded | failed).",
               ("job", "outcome")),
    MetricSpec(RUN_TODO_ROWS, "gauge", "Rows the current run has to process (set when it starts).", ("job",)),
    MetricSpec(FILES_WRITTEN, "counter", "Data files written to the output.", ("job",)),
)
BY_NAME = {s.name: s for s in SPECS}

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names(only_emitted: bool = True) -> set[str]:
    """The Prometheus series names Ray exports for our metrics (`ray_viscpm_rows_total`, `..._bucket`, ...)."""
    return {PREFIX + s.name + suffix for s in SPECS if s.emitted or not only_emitted for suffix in _SUFFIXES[s.kind]}


def enabled() -> bool:
    """Recording is on in this process: inside Ray (a driver or a worker: Ray is imported and initialised) and not
    switched off with VISCPM_METRICS=0."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    ray = sys.modules.get("ray")  # never import Ray just to find out: a process without it records nothing
    return ray is not None and ray.is_initialized()


_objects: dict[str, Any] = {}  # this process's metric objects, made on first use
_objects_lock = threading.Lock()  # a model actor runs two batches at once (threads): one object per name


def _metric(name: str) -> Any:
    with _objects_lock:
        return _objects.get(name) or _make_metric(name)


def _make_metric(name: str) -> Any:
    from ray.util import metrics as rm

    spec = BY_NAME[name]
    if spec.kind == "counter":
        metric = rm.Counter(name, spec.description, tag_keys=spec.tags)
    elif spec.kind == "gauge":
        metric = rm.Gauge(name, spec.description, tag_keys=spec.tags)
    else:
        metric = rm.Histogram(name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)
    _objects[name] = metric
    return metric


def _record(name: str, method: str, value: float, tags: Mapping[str, str]) -> None:
    if not enabled():
        return
    try:
        getattr(_metric(name), method)(value, tags=dict(tags))
    except Exception:  # noqa: BLE001 - metrics must never fail a batch
        logger.debug("metric %s not recorded", name, exc_info=True)


def count(name: str, value: float, **tags: str) -> None:
    """Add `value` to a counter (nothing when value is 0)."""
    if value:
        _record(name, "inc", value, tags)


def observe(name: str, value: float, **tags: str) -> None:
    _record(name, "observe", value, tags)


def set_gauge(name: str, value: float, **tags: str) -> None:
    _record(name, "set", value, tags)


# ---- what the stages and the driver record ---------------------------------------------------------------------
def model_call(job: str, seconds: float, rows: int) -> None:
    observe(MODEL_BATCH_SECONDS, seconds, job=job)
    observe(MODEL_BATCH_ROWS, rows, job=job)


def written(job: str, statuses: Mapping[str, int], errors: Sequence[str | None]) -> None:
    """One data file written: its rows by status, its error rows by the stage named in `error_message`
    (`<stage>: <ExceptionType>: ...`). Counted where rows become output, so these counts equal the output's."""
    for status, n in statuses.items():
        count(ROWS, n, job=job, status=status)
    by_stage: dict[str, int] = {}
    for message in errors:
        if message:
            stage = message.split(":", 1)[0].strip() or "unknown"
            by_stage[stage] = by_stage.get(stage, 0) + 1
    for stage, n in by_stage.items():
        count(STAGE_ERRORS, n, job=job, stage=stage)
    count(FILES_WRITTEN, 1, job=job)


def report_interval_s() -> float:
    """How often Ray's processes report metrics to the node's agent (Ray's `metrics_report_interval_ms`)."""
    return float(os.environ.get("RAY_metrics_report_interval_ms", "10000")) / 1000.0


def linger_for_export() -> None:
    """Keep the driver alive one report interval (+1 s) after its last update: Ray drops an exited process's
    gauges within one or two intervals, so the last-success gauge would otherwise be exported for too short a
    time for a 15 s Prometheus scrape to see it reliably."""
    if enabled():
        time.sleep(report_interval_s() + 1.0)


def run_ended(job: str, succeeded: bool) -> None:
    count(RUNS, 1, job=job, outcome="succeeded" if succeeded else "failed")
    if succeeded:
        set_gauge(LAST_SUCCESS, time.time(), job=job)

"""The write stage (tasks): each batch becomes one data file (+ checkpoint) of the output store, and one stats row
for the driver (rows by status, per-actor model time) - the only thing the driver collects while a job streams."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow as pa

from .. import columns as S
from .. import metrics
from ..stage import Column, Stage
from .files import status_counts
from .store import OutputStore

# `statuses`: JSON {status: rows}; `ok`/`error` are its two statuses every job has
STATS_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()),
                          ("error", pa.int64()), ("statuses", pa.string()), ("actors", pa.string())])


def actor_stats(batch: pa.Table) -> dict[str, dict[str, Any]]:
    """Per model actor: rows, batches, seconds inside the model, first batch start, last batch end, placement."""
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: {"rows": 0, "model_s": 0.0, "batches": set()})
    cols = {c: batch[c].to_pylist() for c in (S.ACTOR, S.NODE, S.DEVICE, S.GPU_IDS, S.MODEL_SECONDS,
                                              S.BATCH_START, S.BATCH_END)}
    for i in range(batch.num_rows):
        s = stats[cols[S.ACTOR][i]]
        s["rows"] += 1
        s["model_s"] += cols[S.MODEL_SECONDS][i]
        s.update(node=cols[S.NODE][i], device=cols[S.DEVICE][i], gpu_ids=cols[S.GPU_IDS][i])
        if cols[S.BATCH_START][i] is not None:  # None: the row never reached the model (an error row)
            s["batches"].add(cols[S.BATCH_START][i])
            s["first_start"] = min(s.get("first_start", float("inf")), cols[S.BATCH_START][i])
            s["last_end"] = max(s.get("last_end", 0.0), cols[S.BATCH_END][i])
    return {a: {**s, "batches": len(s["batches"])} for a, s in stats.items()}


def merge_actor_stats(total: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    for actor, s in part.items():
        t = total.setdefault(actor, {"rows": 0, "model_s": 0.0, "batches": 0, "first_start": float("inf"),
                                     "last_end": 0.0})
        t["rows"] += s["rows"]
        t["model_s"] += s["model_s"]
        t["batches"] += s["batches"]
        t["first_start"] = min(t["first_start"], s.get("first_start", float("inf")))
        t["last_end"] = max(t["last_end"], s.get("last_end", 0.0))
        t.update(node=s["node"], device=s["device"], gpu_ids=s["gpu_ids"])


class WriteStage(Stage):
    """Task stage: one data file (+ checkpoint) per batch through the output store; returns one stats row per file
    for the driver. It requires the job's output columns (`schema`) and the model stage's bookkeeping columns."""

    name = "write"
    produces = tuple(Column(f.name, "write stats") for f in STATS_SCHEMA)

    def __init__(self, store: OutputStore, run: int, schema: pa.Schema) -> None:
        self.store, self.run, self.schema = store, run, schema
        self.requires = tuple(Column(f.name, "output column") for f in schema) + (
            Column(S.ACTOR, "model actor id (bookkeeping)"),
            Column(S.MODEL_SECONDS, "model time share (bookkeeping)"),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        if batch.num_rows == 0:
            return STATS_SCHEMA.empty_table()
        table = batch.select(self.schema.names).cast(self.schema)
        job = self.store.job_name
        try:
            written = self.store.write(self.run, table)
        except Exception:
            metrics.count(metrics.STAGE_ERRORS, table.num_rows, job=job, stage="write")
            raise
        statuses = status_counts(written.index)
        metrics.written(job, statuses, table.column(S.ERROR).to_pylist())  # once per file: counts equal the output's
        return pa.table({"file": [written.name], "rows": [table.num_rows], "ok": [statuses.get(S.STATUS_OK, 0)],
                         "error": [statuses.get(S.STATUS_ERROR, 0)], "statuses": [json.dumps(statuses)],
                         "actors": [json.dumps(actor_stats(batch))]}, schema=STATS_SCHEMA)

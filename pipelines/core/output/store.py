"""The output store: a job's data files and bookkeeping under one folder/prefix, and the one way the runner
(`open_run`, `abandon_run`, `reconcile`, `finish_run`) and the write stage (`write`) touch them - exactly-once
output through job fingerprint, resume state, duplicate resolution and the end-of-job reconciliation.

Why not Ray Data's row checkpointing (`DataContext.checkpoint_config`)? It was evaluated on Ray 2.60 and does
survive a SIGKILLed driver for plain parquet -> parquet (two-phase commit of per-write-task checkpoint files).
It does not fit this job: (1) it filters on a column that must leave the Read operator under the same name and
values as in the written rows - our `key` is derived (a relative path for image folders, `--id-column` of any name
and type turned into a string); (2) `--retry-errors` needs "reprocess ids whose LATEST status is error", which an
id-set filter cannot express; (3) on Ray 2.60's default parquet read path small inputs are packed into one read
task, hence one write task, hence all-or-nothing checkpoints; (4) it is an alpha API whose filter actors reserve
1 GiB each. So the mechanism here is small and explicit:

* Data files are the record of completed work. Each is written whole (atomic rename / single PUT), then its
  checkpoint `_checkpoint/<stem>.parquet` (key, status). On start, a data file without checkpoint (a kill between
  the two writes) is deleted, a checkpoint without data file is deleted, `_tmp-*` leftovers are deleted.
* The ids in the checkpoints are skipped (with `--retry-errors`: only those whose latest status is `ok`).
* Each invocation gets a run number (`_job.json`), part of every file name it writes. When an id is in several
  files - only a `--retry-errors` run (or an interrupted clean-up) produces that - the copy in the newest file
  (highest run, then name) wins and the other files are rewritten without it (new file first, old one deleted
  after), so every crash point converges to one row per id.
* Whatever the bookkeeping says, the job ends by reading the ids of the actual data files and comparing them with
  the input ids: a missing, duplicated or unexpected id fails the job, listing some of them.

`--output` holding a different job (another fingerprint: input, model, question, generation, format, ...) is
refused; holding the same job means resume (a finished job has nothing left to do and is only reconciled again);
`--overwrite` deletes this job's files first. Files in `--output` that are not ours are refused either way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import columns as S
from ..config import canonical_fingerprint
from ..stage import SAMPLE, sample_text
from ..storage import IO_THREADS, Location
from .manifest import STATE_FILE as INCREMENTAL_STATE_FILE
from .files import (CHECKPOINT_DIR, EXTENSIONS, INDEX_SCHEMA, TarMembers, WrittenFile, checkpoint_name, drop_keys,
                    parse_data_file_name, read_index, status_counts, write_data_file, write_encoded)

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
LAST_SUCCESS_FILE = "_last_success.json"  # rewritten by every successful run: a monitor alerts on its age
TMP_PREFIX = "_tmp-"
CARD_FILE = ".huggingface.yaml"  # the dataset card (see card.py); a `.` name, so never a foreign entry
REPORT_FILE = "_report.html"  # --report's contact sheet


@dataclass
class RunStart:
    run: int
    todo: pa.Array  # keys to process this run
    skipped: int  # keys already done before this run

    @property
    def only(self) -> pa.Array | None:
        """The keys to filter the input down to, or None when everything is to be done."""
        return None if self.skipped == 0 else self.todo


class OutputConflictError(RuntimeError):
    """--output holds something this job must not touch (another job, foreign files)."""


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class Reconciliation:
    input_rows: int
    output_rows: int
    statuses: dict[str, int]  # output rows by status
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok_rows(self) -> int:
        return self.statuses.get(S.STATUS_OK, 0)

    @property
    def error_rows(self) -> int:
        return self.statuses.get(S.STATUS_ERROR, 0)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    @property
    def rerun_helps(self) -> bool:
        """A rerun writes missing ids and settles duplicates; ids the input does not have stay whatever it does."""
        return not self.unexpected

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} input ids are missing from the output: {sample_text(self.missing)}")
        if self.duplicated:
            out.append(f"{len(self.duplicated)} ids are in the output more than once: {sample_text(self.duplicated)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} output ids are not in the input (did the input change?): "
                       f"{sample_text(self.unexpected)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "input_rows": self.input_rows, "output_rows": self.output_rows,
                "ok_rows": self.ok_rows, "error_rows": self.error_rows, "statuses": dict(self.statuses),
                "missing": len(self.missing), "duplicated": len(self.duplicated), "unexpected": len(self.unexpected),
                "missing_sample": self.missing[:SAMPLE], "duplicated_sample": self.duplicated[:SAMPLE],
                "unexpected_sample": self.unexpected[:SAMPLE]}


def reconcile(input_keys: pa.Array, index: pa.Table) -> Reconciliation:
    """Compare the ids of the input with the (key, status) rows found in the output's data files."""
    out_keys = index[S.KEY].combine_chunks() if index.num_rows else pa.array([], pa.string())
    counts = pc.value_counts(out_keys)
    dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    missing = pc.filter(input_keys, pc.invert(pc.is_in(input_keys, value_set=out_keys))).to_pylist()
    unexpected = pc.filter(out_keys, pc.invert(pc.is_in(out_keys, value_set=input_keys))).to_pylist()
    return Reconciliation(input_rows=len(input_keys), output_rows=index.num_rows, statuses=status_counts(index),
                          missing=sorted(missing), duplicated=sorted(dup), unexpected=sorted(set(unexpected)))


def last_success(summary: dict[str, Any]) -> dict[str, Any]:
    """`_last_success.json`: when the last successful run finished, and its headline counts."""
    keep = ("job", "mode", "run", "output", "input_rows", "processed_this_run", "statuses_this_run", "files",
            "rows_this_run", "elapsed_s")
    return {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_ts": time.time(),
            **{k: summary[k] for k in keep if k in summary}}


class OutputStore:
    """The files of one job's output folder/prefix."""

    def __init__(self, location: Location, output_format: str, job_name: str, tar_members: TarMembers) -> None:
        """`tar_members`: the job's WebDataset sample layout (row -> [(member suffix, bytes)], a module-level
        function so that the store pickles into the write tasks)."""
        self.location = location
        self.job_name = job_name  # "caption" | "paint": recorded in _job.json, named in messages
        self.output_format = output_format
        self.tar_members = tar_members
        self.ext = EXTENSIONS[output_format]

    # ---- writing -----------------------------------------------------------------------------------------------
    def write(self, run: int, table: pa.Table) -> WrittenFile:
        """One data file of `table`'s rows (sorted by key, named by run + a hash of its keys), then its checkpoint."""
        return write_data_file(self.location, run, table, self.output_format, self.tar_members)

    # ---- listing ---------------------------------------------------------------------------------------------
    def _names(self, location: Location) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in location.list_files()]

    def data_files(self) -> list[str]:
        return sorted(n for n in self._names(self.location) if parse_data_file_name(n))

    def checkpoint_files(self) -> list[str]:
        return sorted(n for n in self._names(self.location.child(CHECKPOINT_DIR)) if n.endswith(".parquet"))

    def foreign_entries(self) -> list[str]:
        """Entries directly under the output that are neither our data files nor `_`/`.`-prefixed."""
        if not self.location.exists():
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1]
                 for e in self.location.fs.ls(self.location.path, detail=True)]
        return sorted(n for n in names if n and not n.startswith(("_", ".")) and not parse_data_file_name(n))

    # ---- job file ----------------------------------------------------------------------------------------------
    def read_job(self) -> dict[str, Any] | None:
        loc = self.location.child(JOB_FILE)
        return json.loads(loc.read_bytes()) if loc.exists() else None

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        self.location.child(name).write_bytes_atomic(
            json.dumps(value, indent=2, ensure_ascii=False, default=str).encode("utf-8"))

    def delete_job_files(self) -> int:
        """--overwrite: this job's files only (data files, _checkpoint/, _job.json, _summary.json, the card, the
        report, _tmp-*)."""
        names = self.data_files() + [n for n in self._names(self.location)
                                     if n in (JOB_FILE, SUMMARY_FILE, LAST_SUCCESS_FILE, CARD_FILE, REPORT_FILE)
                                     or n.startswith(TMP_PREFIX)]
        for name in names:
            self.location.child(name).delete()
        ckpt = self.location.child(CHECKPOINT_DIR)
        for name in self._names(ckpt):
            ckpt.child(name).delete()
        return len(names)

    def check_compatible(self, fingerprint: dict[str, Any], overwrite: bool = False) -> None:
        """Raise OutputConflictError if this job cannot run into the output: read-only, so that the runner decides
        it before Ray starts. Each message names the cause and the fix."""
        if self.location.child(INCREMENTAL_STATE_FILE).exists():
            raise OutputConflictError(
                f"--output {self.location.uri} holds the output of --incremental runs ({INCREMENTAL_STATE_FILE}), "
                f"which this run (without --incremental) would not update. Add --incremental to continue it, or use "
                "another --output.")
        foreign = self.foreign_entries()
        if foreign:
            raise OutputConflictError(
                f"--output {self.location.uri} holds entries that are not part of a {self.job_name} job: "
                f"{sample_text(foreign)}. "
                "Use an empty folder/prefix (or one written by this job).")
        if overwrite:
            return
        self._bound_job(_json_normal(fingerprint))

    def _bound_job(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The `_job.json` this run continues (None: a new job), or OutputConflictError when it is another job's."""
        job = self.read_job()
        if job is not None and not (self.data_files() or self.checkpoint_files()) and (
                job.get("job", self.job_name) != self.job_name
                or canonical_fingerprint(job.get("fingerprint", {})) != fingerprint):
            # runs that wrote nothing (refused, failed, killed early) bind nothing: the corrected command starts afresh
            job = None
        if job is None:
            if self.data_files():
                raise OutputConflictError(
                    f"--output {self.location.uri} holds data files but no {JOB_FILE}: cannot tell which job "
                    "wrote them. Use another --output, or --overwrite to delete them.")
            return None
        if job.get("job", self.job_name) != self.job_name:
            raise OutputConflictError(
                f"--output {self.location.uri} holds the output of a {job['job']} job, not of a {self.job_name} "
                "job. Use another --output (or --overwrite to replace it).")
        if canonical_fingerprint(job.get("fingerprint", {})) != fingerprint:
            old = canonical_fingerprint(job.get("fingerprint", {}))
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
            # outputs written before the kind was recorded lack it: other keys mean another kind of job
            what = (f"a different {self.job_name} job" if job.get("job") or set(old) == set(fingerprint)
                    else "a different job (of another kind?)")
            raise OutputConflictError(
                f"--output {self.location.uri} holds {what} (differs in {details}). Resuming needs the same "
                "settings; use another --output, or --overwrite to replace that job.")
        return job

    def start_run(self, fingerprint: dict[str, Any], mode: str, overwrite: bool = False) -> int:
        """Check the output against this job and register a new run; returns its number."""
        self.check_compatible(fingerprint, overwrite=overwrite)
        if overwrite:
            removed = self.delete_job_files()
            if removed:
                logger.warning("--overwrite: deleted %d files of a previous job in %s", removed, self.location.uri)
        fingerprint = _json_normal(fingerprint)
        job = self._bound_job(fingerprint)
        if job is None:
            job = {"version": 1, "job": self.job_name, "fingerprint": fingerprint, "runs": []}
        run = max([r["run"] for r in job["runs"]], default=0) + 1
        job["runs"].append({"run": run, "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "finished": None, "ok": None})
        self.write_json(JOB_FILE, job)
        self._job = job
        return run

    def open_run(self, keys: pa.Array, fingerprint: dict[str, Any], retry_errors: bool = False,
                 overwrite: bool = False, final_statuses: Sequence[str] = (S.STATUS_OK,)) -> RunStart:
        """Start a run for a job (its fingerprint) over the input `keys`: register it, clean up what interrupted
        writes left, settle duplicates, and work out the keys still to do. A key is done when a checkpointed row has
        it; with `retry_errors` only rows whose status is in `final_statuses` count as done."""
        mode = "retry-errors" if retry_errors else "normal"
        run = self.start_run(fingerprint, mode, overwrite=overwrite)
        self.clean_incomplete()
        self.resolve_duplicates(run)
        state = self.checkpoint_index()
        if retry_errors:
            state = state.filter(pc.is_in(state[S.STATUS], value_set=pa.array(list(final_statuses), pa.string())))
        todo = pc.filter(keys, pc.invert(pc.is_in(keys, value_set=state[S.KEY]))) if state.num_rows else keys
        start = RunStart(run, todo, len(keys) - len(todo))
        logger.info("run %d (%s): %d keys in the input, %d already done, %d to process", run, mode, len(keys),
                    start.skipped, len(todo))
        return start

    def reconcile(self, run: int, keys: pa.Array) -> Reconciliation:
        """After a run: let its rows supersede older ones (--retry-errors), then compare the ids in the data files
        with the input's."""
        self.resolve_duplicates(run)
        return reconcile(keys, self.data_index())

    def snapshot(self) -> bytes | None:
        """The `_job.json` as it is before a run (None: there is none), for `abandon_run`."""
        loc = self.location.child(JOB_FILE)
        return loc.read_bytes() if loc.exists() else None

    def abandon_run(self, run: int, before: bytes | None) -> bool:
        """After a failed run: if it wrote no data file, put `_job.json` back as `before` (delete it when there was
        none), so the failure claims nothing; returns whether it did. A run that wrote data keeps its entry: the
        next run resumes from it."""
        if any(parse_data_file_name(n)[0] == run for n in self.data_files()):
            return False
        job = self.location.child(JOB_FILE)
        if before is None:
            job.delete()
            if self.location.is_local and self.location.isdir() and not self.location.fs.ls(self.location.path):
                self.location.fs.rmdir(self.location.path)  # the folder this run created, still empty
        else:
            job.write_bytes_atomic(before)
        logger.info("run %d wrote no data: %s left as it was", run, self.location.uri)
        return True

    def finish_run(self, run: int, ok: bool, summary: dict[str, Any]) -> None:
        job = getattr(self, "_job", None) or self.read_job() or {"runs": []}
        for entry in job["runs"]:
            if entry["run"] == run:
                entry.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ok=ok,
                             processed=summary.get("processed_this_run"))
        self.write_json(JOB_FILE, job)
        self.write_json(SUMMARY_FILE, summary)
        if ok:
            self.write_json(LAST_SUCCESS_FILE, last_success(summary))

    # ---- resume state ------------------------------------------------------------------------------------------
    def clean_incomplete(self) -> dict[str, int]:
        """Delete what interrupted writes left: data files without checkpoint, checkpoints without data file, and
        temporary files."""
        data = set(self.data_files())
        ckpts = set(self.checkpoint_files())
        ckpt_of = {checkpoint_name(d): d for d in data}
        orphan_data = [d for d in data if checkpoint_name(d) not in ckpts]
        orphan_ckpt = [c for c in ckpts if c not in ckpt_of]
        tmp = [n for n in self._names(self.location) if n.startswith(TMP_PREFIX)]
        tmp += [f"{CHECKPOINT_DIR}/{n}" for n in self._names(self.location.child(CHECKPOINT_DIR))
                if n.startswith(TMP_PREFIX)]
        for name in orphan_data + tmp:
            self.location.child(name).delete()
        for name in orphan_ckpt:
            self.location.child(CHECKPOINT_DIR, name).delete()
        counts = {"incomplete_data_files": len(orphan_data), "orphan_checkpoints": len(orphan_ckpt),
                  "temp_files": len(tmp)}
        if any(counts.values()):
            logger.info("resume clean-up in %s: %s", self.location.uri, counts)
        return counts

    def _read_many(self, names: Sequence[str], read) -> pa.Table:
        def one(name: str) -> pa.Table:
            table = read(name)
            return table.append_column("file", pa.array([name] * table.num_rows, pa.string()))

        if not names:
            return INDEX_SCHEMA.empty_table().append_column("file", pa.array([], pa.string()))
        with ThreadPoolExecutor(min(IO_THREADS, len(names))) as pool:
            return pa.concat_tables(list(pool.map(one, names)))

    def checkpoint_index(self) -> pa.Table:
        """(key, status, file) of every completed data file, from the checkpoints (cheap: small parquet files)."""
        ckpt = self.location.child(CHECKPOINT_DIR)
        by_ckpt = {checkpoint_name(d): d for d in self.data_files()}

        def read(name: str) -> pa.Table:
            return pq.read_table(pa.BufferReader(ckpt.child(checkpoint_name(name)).read_bytes())).cast(INDEX_SCHEMA)

        return self._read_many([by_ckpt[c] for c in self.checkpoint_files() if c in by_ckpt], read)

    def data_index(self) -> pa.Table:
        """(key, status, file) read from the data files themselves - the ground truth for reconciliation."""
        return self._read_many(self.data_files(),
                               lambda name: read_index(self.location.child(name).read_bytes(), self.output_format))

    def resolve_duplicates(self, run: int) -> int:
        """Keep each id's row from its newest file (highest run, then name); rewrite the other files without it.
        Returns how many rows were removed."""
        index = self.checkpoint_index()
        if index.num_rows == 0:
            return 0
        counts = pc.value_counts(index[S.KEY])
        dup_keys = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(dup_keys) == 0:
            return 0
        dups = index.filter(pc.is_in(index[S.KEY], value_set=dup_keys)).to_pylist()
        newest: dict[str, str] = {}
        order = lambda name: (parse_data_file_name(name)[0], name)  # noqa: E731
        for row in dups:
            if row[S.KEY] not in newest or order(row["file"]) > order(newest[row[S.KEY]]):
                newest[row[S.KEY]] = row["file"]
        drop: dict[str, set[str]] = {}
        for row in dups:
            if newest[row[S.KEY]] != row["file"]:
                drop.setdefault(row["file"], set()).add(row[S.KEY])
        removed = 0
        for name, keys in sorted(drop.items()):
            removed += self._drop_from_file(name, keys, run)
        logger.info("resolved %d duplicated ids in %s: %d superseded rows removed from %d files", len(dup_keys),
                    self.location.uri, removed, len(drop))
        return removed

    def _drop_from_file(self, name: str, keys: set[str], run: int) -> int:
        old = self.location.child(name)
        data, left = drop_keys(old.read_bytes(), self.output_format, keys)
        if left.num_rows:
            # the remainder goes to a NEW file (data, then checkpoint) before the old one is deleted, so a crash in
            # between leaves duplicates that the next start resolves the same way - never a lost row
            if write_encoded(self.location, run, data, left, self.output_format).name == name:
                return 0  # same rows -> same name: nothing was dropped after all
        old.delete()
        self.location.child(CHECKPOINT_DIR, checkpoint_name(name)).delete()
        return len(keys)

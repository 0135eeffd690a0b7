"""`--incremental`: scheduled enrichment of a growing input, one input file at a time (both jobs).

    list the input once (sizes + ETags/mtimes) -> read the manifest -> new / changed / unchanged / removed
    for each new or changed file (and, with --retry-errors, each done file with error rows):
        plan that file alone (the job's own id checks; a bad file is refused and the others go on)
        -> the job's usual pipeline into a staging store `_staging/<unit>/` (resume, reconciliation per file)
        -> merge into `<dir>/<name>.<parquet|tar>` (parts `<name>-00000...` past --rows-per-file), replacing the
           file's previous output -> manifest entry -> staging deleted
    removed files: output kept and reported (--prune: output and entry deleted)
    -> `_summary.json`, `_last_success.json` (when every file succeeded)

Crash safety, per input file: the staging store is the job's ordinary exactly-once output (a killed run resumes
there); the final output is written before the manifest entry, and the entry is what marks the file done, so a kill
between the two only makes the next run redo the (already staged) merge. An input file in the manifest is never
opened again - not even its headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics, stop
from .inputs import InputError, list_input, skipped_files_text
from .output import OutputConflictError, OutputStore
from .output.files import EXTENSIONS, TarMembers, merge_data_files, read_index, write_encoded
from .output.manifest import STATE_FILE, Manifest, read_state, same_source, source_identity
from .output.store import JOB_FILE, LAST_SUCCESS_FILE, SUMMARY_FILE, last_success
from .runner import JobResult, format_statuses
from .stage import sample_text
from .storage import Location, locate, relative_key, with_retries

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"
SOURCE_FILE = "_source.json"


@dataclass
class IncrementalJob:
    """What the incremental driver needs from a job. `run_unit(unit_config, staging_store)` plans the one input file
    named by `unit_config.input` (raising InputError for a bad file) and runs the job's pipeline into the store."""

    name: str  # caption | paint
    unit: str  # what a row is, in messages
    extensions: tuple[str, ...]
    tar_members: TarMembers
    run_unit: Callable[[Any, OutputStore], JobResult]


@dataclass
class IncrementalResult:
    """The outcome of one incremental run (`succeeded`: every file to do was done, none refused or failed)."""

    job: str
    unit: str
    output: str
    run: int
    files: dict[str, int]
    refused: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # input files named but not read (another extension)
    statuses: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    elapsed_s: float = 0.0
    listing_s: float = 0.0
    pipeline_s: float = 0.0
    stopped: bool = False
    lease_taken_over: dict[str, Any] | None = None
    report: str | None = None

    @property
    def succeeded(self) -> bool:
        return not (self.refused or self.failed or self.stopped)

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def problems(self) -> list[str]:
        out = [f"refused input file {r['path']}: {r['reason']}" for r in self.refused]
        out += [f"input file {r['path']} failed: {r['reason']}" for r in self.failed]
        if self.stopped:
            out.append(f"stopped on {stop.signal_name()} before every file was done; rerun the same command to resume")
        return out

    def one_line(self) -> str:
        f = self.files
        head = f"{self.job} job (incremental) {'done' if self.succeeded else 'NOT complete'}"
        return (f"{head}: input files {f['new']} new, {f['changed']} changed, {f['unchanged']} unchanged, "
                f"{f['removed']} removed{' (pruned)' if f.get('pruned') else ''}, {f['refused']} refused; "
                f"{f['done']} done this run; {self.processed} {self.unit} ({format_statuses(self.statuses)}); "
                f"{self.elapsed_s:.1f} s -> {self.output}"
                f"{'; ' + skipped_files_text(self.skipped_files) if self.skipped_files else ''}")

    def to_summary(self, config: Any, totals: dict[str, int]) -> dict[str, Any]:
        return {"succeeded": self.succeeded, "job": self.job, "mode": "incremental", "run": self.run,
                "output": self.output, "files": self.files, "refused": self.refused, "failed": self.failed,
                "removed_files": self.removed[:100], "skipped_files": list(self.skipped_files),
                "processed_this_run": self.processed,
                "rows_this_run": self.statuses, "rows_in_output": totals, "elapsed_s": round(self.elapsed_s, 3),
                "listing_s": round(self.listing_s, 3), "pipeline_s": round(self.pipeline_s, 3),
                "rows_per_s": round(self.rows_per_s, 3), "stopped": self.stopped,
                "lease_taken_over": self.lease_taken_over, "problems": self.problems(),
                "config": config.public_dict()}


def output_names(relative: str, ext: str, parts: int) -> list[str]:
    """`<dir>/<name>.<ext>` for one part, else `<dir>/<name>-00000.<ext>`, ... (`<name>` without a compressed
    shard's `.tar.gz`: `a.tar.gz` and `a.tar` share an output name, so the second is refused)"""
    base = posixpath.basename(relative)
    suffix = ".tar.gz" if base.lower().endswith(".tar.gz") and len(base) > 7 else None
    stem = (relative[:-len(suffix)] if suffix else relative.rsplit(".", 1)[0]) if "." in base else relative
    if parts == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i:05d}.{ext}" for i in range(parts)]


def staging_name(relative: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.basename(relative))[:60]
    return f"{hashlib.sha256(relative.encode('utf-8')).hexdigest()[:16]}-{safe}"


class IncrementalRun:
    def __init__(self, config: Any, job: IncrementalJob, storage_options: dict[str, Any]) -> None:
        self.config, self.job, self.storage_options = config, job, storage_options
        self.output = locate(config.output, storage_options)
        self.ext = EXTENSIONS[config.output_format]
        self.fingerprint = json.loads(json.dumps(config.fingerprint(), sort_keys=True, default=str))
        self.fingerprint_id = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]

    # ---- start ----------------------------------------------------------------------------------------------
    def check_output(self) -> int:
        """Refuse an output of another job / a normal-mode output; register this run; returns its number."""
        if self.output.child(JOB_FILE).exists():
            raise OutputConflictError(f"--output {self.output.uri} holds the output of a normal (not --incremental) "
                                      "run. Use another --output for incremental runs.")
        state = read_state(self.output)
        if state is not None and (state.get("job") != self.job.name or state.get("fingerprint") != self.fingerprint):
            old = state.get("fingerprint", {})
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            details = "; ".join(f"{k}: {old.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in diff)
            raise OutputConflictError(
                f"--output {self.output.uri} holds the incremental output of a different "
                f"{state.get('job', '?')} job (differs in {details or 'the job kind'}). Use another --output.")
        return int((state or {}).get("last_run", 0)) + 1

    def write_state(self, run: int) -> None:
        self.output.child(STATE_FILE).write_bytes_atomic(json.dumps(
            {"version": 1, "job": self.job.name, "fingerprint": self.fingerprint, "last_run": run}, indent=2,
            default=str).encode("utf-8"))

    # ---- one input file -------------------------------------------------------------------------------------
    def staging(self, relative: str) -> OutputStore:
        return OutputStore(self.output.child(STAGING_DIR, staging_name(relative)), self.config.output_format,
                           self.job.name, self.job.tar_members)

    def delete_tree(self, location: Location) -> None:
        def rm() -> None:
            try:
                location.fs.rm(location.path, recursive=True)
            except FileNotFoundError:
                pass

        with_retries(rm, f"delete {location.uri}")
        location.fs.invalidate_cache(location.path)

    def prepare_staging(self, relative: str, source: dict[str, Any], old: dict[str, Any] | None,
                        retry: bool) -> OutputStore:
        """The file's staging store: kept when it is for this very version of the file (a resumed run), else new;
        for a --retry-errors pass over a done file it starts as a copy of the file's current output."""
        store = self.staging(relative)
        marker = store.location.child(SOURCE_FILE)
        want = {"source": source, "retry": retry, "fingerprint": self.fingerprint_id}
        if marker.exists():
            if json.loads(marker.read_bytes()) == want:
                return store
            self.delete_tree(store.location)
        marker.write_bytes_atomic(json.dumps(want).encode("utf-8"))
        if retry and old is not None:
            unit_config = self.unit_config(relative, retry=False)
            run = store.start_run(unit_config.fingerprint(), "seed")
            for name in old.get("outputs", []):
                data = self.output.child(name).read_bytes()
                store_index = read_index(data, self.config.output_format)
                write_encoded(store.location, run, data, store_index, self.config.output_format)
            store.finish_run(run, True, {"seeded_from": old.get("outputs", [])})
        return store

    def unit_config(self, relative: str, retry: bool) -> Any:
        return dataclasses.replace(self.config, input=self.root.uri_of(self.file_path(relative)), incremental=False,
                                   prune=False, retry_errors=retry, overwrite=False)

    def file_path(self, relative: str) -> str:
        return f"{self.root.path.rstrip('/')}/{relative}"  # fsspec paths use `/` locally too

    def finalize(self, run: int, relative: str, source: dict[str, Any], store: OutputStore,
                 old: dict[str, Any] | None, result: JobResult, manifest: Manifest, seconds: float) -> dict[str, Any]:
        """Merge the staging data into the file's output, replace its previous output, record the manifest entry,
        drop the staging store. Runs with SIGTERM deferred: it leaves either the old entry or the new one."""
        datas = [store.location.child(n).read_bytes() for n in store.data_files()]
        parts = merge_data_files(datas, self.config.output_format, self.config.rows_per_file)
        names = output_names(relative, self.ext, len(parts))
        statuses: Counter = Counter()
        for name, (data, index) in zip(names, parts):
            self.output.child(name).write_bytes_atomic(data)
            statuses.update(Counter(index.column("status").to_pylist()))
        for stale in sorted(set((old or {}).get("outputs", [])) - set(names)):
            self.output.child(stale).delete()  # a changed file's old parts: its old rows never stay
        entry = {**source, "rows": sum(index.num_rows for _, index in parts), "statuses": dict(statuses),
                 "outputs": names, "fingerprint": self.fingerprint_id, "seconds": round(seconds, 3),
                 "run_rows": result.processed}
        manifest.record(run, relative, entry)
        self.delete_tree(store.location)
        return entry

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(self, ray_init: Callable[[], None] | None, started: float, lease: Any = None) -> IncrementalResult:
        config = self.config
        t0 = time.monotonic()
        # an input with no files yet is fine here: a later run finds them
        inputs = list_input(config.input, self.storage_options, self.job.extensions,
                            f"input files ({', '.join('.' + e for e in self.job.extensions)})", allow_empty=True)
        self.root = inputs.root
        listing = {relative_key(self.root.path, p): source_identity(i) for p, i in inputs.files.items()}
        run = self.check_output()
        manifest = Manifest.read(self.output)
        listing_s = time.monotonic() - t0
        self.write_state(run)

        new = [p for p in listing if p not in manifest.entries]
        changed = [p for p in listing if p in manifest.entries and not same_source(listing[p], manifest.entries[p])]
        unchanged = [p for p in listing if p in manifest.entries and p not in changed]
        removed = sorted(p for p in manifest.entries if p not in listing)
        retry = [p for p in unchanged if config.retry_errors and manifest.entries[p].get("statuses", {}).get("error")]
        result = IncrementalResult(self.job.name, self.job.unit, self.output.uri, run,
                                   files={"listed": len(listing), "new": len(new), "changed": len(changed),
                                          "unchanged": len(unchanged), "removed": len(removed), "pruned": 0,
                                          "retried": len(retry), "refused": 0, "failed": 0, "done": 0,
                                          "pending": 0},
                                   removed=removed, skipped_files=inputs.skipped_names, listing_s=listing_s,
                                   lease_taken_over=getattr(lease, "took_over", None))
        for kind, files in (("new", new), ("changed", changed), ("unchanged", unchanged), ("removed", removed)):
            metrics.count(metrics.INPUT_FILES, len(files), job=self.job.name, kind=kind)
        logger.info("incremental run %d: %d input files listed - %d new, %d changed, %d unchanged, %d removed%s",
                    run, len(listing), len(new), len(changed), len(unchanged), len(removed),
                    f", {len(retry)} with error rows to retry" if retry else "")
        if removed:
            logger.warning("%d input files are gone from the input; their output is %s: %s", len(removed),
                           "deleted (--prune)" if config.prune else "kept (--prune deletes it)", sample_text(removed))
        self.clean_staging(manifest, listing)
        if config.prune:
            for path in removed:
                for name in manifest.entries[path].get("outputs", []):
                    self.output.child(name).delete()
                manifest.remove(run, path)
                result.files["pruned"] += 1

        # a stem shared by two input files (prompts.txt and prompts.jsonl) would share an output file
        stems: dict[str, str] = {}
        for path in sorted(listing):
            stems.setdefault(output_names(path, self.ext, 1)[0], path)
        todo = [(p, False) for p in sorted(new + changed)] + [(p, True) for p in sorted(retry)]
        counts: Counter = Counter()
        ray_started = False
        try:
            for i, (relative, is_retry) in enumerate(todo):
                if stop.requested.is_set() or (lease is not None and lease.lost):
                    result.stopped = True
                    result.files["pending"] = len(todo) - i
                    break
                owner = stems[output_names(relative, self.ext, 1)[0]]
                if owner != relative:
                    result.refused.append({"path": relative, "reason": f"its output name would be the same as "
                                           f"{owner}'s ({output_names(relative, self.ext, 1)[0]}); rename one"})
                    continue
                if not ray_started and ray_init is not None:
                    ray_init()
                ray_started = True
                old = manifest.entries.get(relative)
                t_file = time.monotonic()
                store = self.prepare_staging(relative, listing[relative], old, is_retry)
                try:
                    with stop.interruptible():
                        unit = self.job.run_unit(self.unit_config(relative, is_retry), store)
                except InputError as exc:
                    logger.error("refused input file %s: %s", relative, exc)
                    result.refused.append({"path": relative, "reason": str(exc)})
                    self.delete_tree(store.location)
                    continue
                result.pipeline_s += unit.pipeline_s
                if not unit.succeeded:
                    reason = "; ".join(unit.reconciliation.problems())
                    logger.error("input file %s: %s (its staged rows are kept; rerun to complete it)", relative,
                                 reason)
                    result.failed.append({"path": relative, "reason": reason})
                    continue
                entry = self.finalize(run, relative, listing[relative], store, old, unit, manifest,
                                      time.monotonic() - t_file)
                counts.update(unit.statuses)
                result.processed += unit.processed
                result.files["done"] += 1
                logger.info("input file %s done: %d %s this run -> %s (%d/%d)", relative, unit.processed,
                            self.job.unit, ", ".join(entry["outputs"]) or "no rows", i + 1, len(todo))
        except stop.StopRequested:
            result.stopped = True
            result.files["pending"] = len(todo) - result.files["done"] - len(result.refused) - len(result.failed)
            logger.warning("stopped on %s: %d input files done this run, %d left for the next run",
                           stop.signal_name(), result.files["done"], result.files["pending"])
        result.statuses = dict(counts)
        result.files["refused"], result.files["failed"] = len(result.refused), len(result.failed)
        manifest.compact(run)
        result.elapsed_s = time.monotonic() - started
        totals: Counter = Counter()
        for entry in manifest.entries.values():
            totals.update(entry.get("statuses", {}))
        summary = result.to_summary(config, dict(totals))
        self.write_json(SUMMARY_FILE, summary)
        if result.succeeded:
            self.write_json(LAST_SUCCESS_FILE, last_success(summary))
        return result

    def clean_staging(self, manifest: Manifest, listing: dict[str, dict[str, Any]]) -> None:
        """Staging stores of files that are done (a kill after the manifest entry) or gone are deleted."""
        folder = self.output.child(STAGING_DIR)
        if not folder.exists():
            return
        live = {staging_name(p) for p in listing
                if p not in manifest.entries or not same_source(listing[p], manifest.entries[p])
                or (self.config.retry_errors and manifest.entries[p].get("statuses", {}).get("error"))}
        for entry in with_retries(lambda: folder.fs.ls(folder.path, detail=True), f"list {folder.uri}"):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name not in live:
                self.delete_tree(folder.child(name))

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        self.output.child(name).write_bytes_atomic(
            json.dumps(value, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def run_incremental(config: Any, job: IncrementalJob, storage_options: dict[str, Any],
                    ray_init: Callable[[], None] | None, started: float, lease: Any = None) -> IncrementalResult:
    """One incremental run (the caller holds the output's lease)."""
    return IncrementalRun(config, job, storage_options).run(ray_init, started, lease)

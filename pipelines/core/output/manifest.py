"""The manifest of an `--incremental` output: which input files are done, with what result. It is the only thing an
incremental run reads to decide what is done - an input file in the manifest is never opened again.

    <output>/_incremental.json                 job kind, fingerprint, last run number
    <output>/_manifest/snapshot-r<run>.json    every entry as of the end of run <run> (compacted)
    <output>/_manifest/entries/r<run>-<n>.json one entry written during run <run>, after that input file's output
                                               was complete (or a removal with --prune)

Entries are keyed by the input file's path relative to `--input`. One entry per file costs one small PUT, so the
manifest never grows by rewriting a big file per input file; at the end of a run the snapshot is rewritten once and
the entries it absorbed are deleted. Reading = one listing of `_manifest/`, the newest snapshot and the entries of
later runs (a crash between writing a snapshot and deleting the entries it absorbed leaves entries of runs <= the
snapshot's run: they are ignored).
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..storage import IO_THREADS, Location, with_retries

logger = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
STATE_FILE = "_incremental.json"
_SNAPSHOT_RE = re.compile(r"^snapshot-r(\d+)\.json$")
_ENTRY_RE = re.compile(r"^r(\d+)-(\d+)\.json$")


def source_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies one version of an input file from its listing: size and ETag (S3), else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") if etag is None else None
    if mtime is None and etag is None:
        modified = info.get("LastModified") or info.get("last_modified")
        mtime = str(modified) if modified is not None else None
    return {"size": int(info.get("size") or 0), "etag": etag.strip('"') if isinstance(etag, str) else etag,
            "mtime": float(mtime) if isinstance(mtime, (int, float)) else mtime}


def same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("size") != b.get("size"):
        return False
    if a.get("etag") or b.get("etag"):
        return a.get("etag") == b.get("etag")
    return a.get("mtime") == b.get("mtime")


@dataclass
class Manifest:
    """The manifest of one output, read at the start of a run; `record`/`remove` append entries as files finish."""

    output: Location
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot_run: int = 0
    max_run: int = 0
    _seq: int = 0

    @classmethod
    def read(cls, output: Location) -> "Manifest":
        folder = output.child(MANIFEST_DIR)
        names = [p[len(folder.path) + 1:] for p in folder.list_files(recursive=True)]
        snapshots = sorted((int(m.group(1)), n) for n in names if (m := _SNAPSHOT_RE.match(n)))
        manifest = cls(output)
        if snapshots:
            run, name = snapshots[-1]
            data = json.loads(folder.child(name).read_bytes())
            manifest.entries, manifest.snapshot_run = dict(data["entries"]), run
        later = sorted((int(m.group(1)), int(m.group(2)), n) for n in names
                       if n.startswith("entries/") and (m := _ENTRY_RE.match(n[len("entries/"):]))
                       and int(m.group(1)) > manifest.snapshot_run)
        if later:
            with ThreadPoolExecutor(min(IO_THREADS, len(later))) as pool:
                docs = list(pool.map(lambda t: json.loads(folder.child(t[2]).read_bytes()), later))
            for doc in docs:
                if doc.get("entry") is None:
                    manifest.entries.pop(doc["path"], None)
                else:
                    manifest.entries[doc["path"]] = doc["entry"]
        manifest.max_run = max([manifest.snapshot_run, *(r for r, _, _ in later)])
        return manifest

    def _append(self, run: int, path: str, entry: dict[str, Any] | None) -> None:
        self._seq += 1
        doc = {"run": run, "path": path, "entry": entry}
        self.output.child(MANIFEST_DIR, "entries", f"r{run:06d}-{self._seq:06d}.json").write_bytes_atomic(
            json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8"))
        if entry is None:
            self.entries.pop(path, None)
        else:
            self.entries[path] = entry

    def record(self, run: int, path: str, entry: dict[str, Any]) -> None:
        """An input file's output is complete: its entry (written only now)."""
        self._append(run, path, {**entry, "path": path, "run": run,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def remove(self, run: int, path: str) -> None:
        """--prune: the input file is gone and so is its output."""
        self._append(run, path, None)

    def compact(self, run: int) -> None:
        """Rewrite the snapshot as of now and drop the entries and older snapshots it absorbed."""
        folder = self.output.child(MANIFEST_DIR)
        names = [p[len(folder.path) + 1:] for p in folder.list_files(recursive=True)]
        if not any(n.startswith("entries/") for n in names):
            return  # nothing recorded since the snapshot (a no-op run writes no manifest)
        folder.child(f"snapshot-r{run:06d}.json").write_bytes_atomic(json.dumps(
            {"version": 1, "run": run, "entries": self.entries}, ensure_ascii=False, indent=0,
            default=str).encode("utf-8"))
        old = [n for n in names if ((m := _SNAPSHOT_RE.match(n)) and int(m.group(1)) < run)
               or (n.startswith("entries/") and (m := _ENTRY_RE.match(n[len("entries/"):]))
                   and int(m.group(1)) <= run)]
        if old:
            with ThreadPoolExecutor(min(IO_THREADS, len(old))) as pool:
                list(pool.map(lambda n: folder.child(n).delete(), old))
        self.snapshot_run = run


def read_state(output: Location) -> dict[str, Any] | None:
    loc = output.child(STATE_FILE)
    try:
        return json.loads(with_retries(loc.read_bytes, f"read {loc.uri}"))
    except FileNotFoundError:
        return None

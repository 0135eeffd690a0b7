"""Progress in rows for the whole run (`pipelines.core.progress`, used by `runner.execute`): a tqdm bar on a
terminal, log lines with the same facts otherwise."""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa

from pipelines.core.output.write import STATS_SCHEMA
from pipelines.core.progress import RowProgress, format_eta
from pipelines.core.runner import execute


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class StatsRows:
    """What `execute` iterates: the write stage's stats rows, one per data file."""

    def __init__(self, files: list[dict[str, int]]) -> None:
        self.files = files

    def iter_batches(self, **_: object):
        for i, statuses in enumerate(self.files):
            rows = sum(statuses.values())
            actors = {"a1": {"rows": rows, "model_s": 0.1, "batches": 1, "first_start": 1.0 + i, "last_end": 1.5 + i,
                             "node": "n", "device": "cpu", "gpu_ids": ""}}
            yield pa.table({"file": [f"part-{i}"], "rows": [rows], "ok": [statuses.get("ok", 0)],
                            "error": [statuses.get("error", 0)], "statuses": [json.dumps(statuses)],
                            "actors": [json.dumps(actors)]}, schema=STATS_SCHEMA)


def test_a_bar_on_a_terminal_with_rows_rate_and_counts():
    terminal = FakeTerminal()
    progress = RowProgress(12, "rows", every_s=0.0, job="caption", stream=terminal)  # bar: the stream is a tty
    progress.update(8, {"ok": 7, "error": 1})
    progress.update(4, {"ok": 3, "error": 1})
    progress.close()
    text = terminal.getvalue()
    assert "\r" in text and "caption" in text and "12/12" in text and "100%" in text
    assert "10 ok, 2 error" in text and "row/s" in text


def test_log_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.core.progress")
    stream = io.StringIO()  # not a tty: no bar, nothing written to it
    progress = RowProgress(12, "images", every_s=0.0, job="paint", stream=stream)
    progress.update(4, {"ok": 2, "blocked": 1, "error": 1})
    progress.close()
    assert stream.getvalue() == ""
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("progress: 4/12 images (33%), 2 ok, 1 blocked, 1 error, ") and "images/s, ETA 0:" in line
    assert "\r" not in line


def test_log_lines_are_spaced_by_every_s(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.core.progress")
    progress = RowProgress(100, every_s=3600.0, stream=io.StringIO())
    for _ in range(10):
        progress.update(10, {"ok": 10})
    assert not caplog.records  # the first line is due an hour after the start


def test_execute_counts_and_shows_progress(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.core.progress")
    files = [{"ok": 3, "error": 1}, {"ok": 4}, {"ok": 2, "error": 2}]
    counts = execute(StatsRows(files), total=12, progress_every_s=0.0, unit="rows", job="caption", bar=False)
    assert counts.processed == 12 and counts.files == 3 and dict(counts.statuses) == {"ok": 9, "error": 3}
    assert list(counts.actors) == ["caption-0"] and counts.actors["caption-0"]["rows"] == 12
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("progress: 12/12 rows (100%), 9 ok, 3 error")

    terminal = FakeTerminal()
    import sys

    saved, sys.stderr = sys.stderr, terminal  # bar=None: a bar when stderr is a terminal
    try:
        execute(StatsRows(files), total=12, progress_every_s=0.0, unit="rows", job="caption")
    finally:
        sys.stderr = saved
    assert "12/12" in terminal.getvalue() and "9 ok, 3 error" in terminal.getvalue()


def test_eta_format():
    assert format_eta(None) == "?" and format_eta(3725.4) == "1:02:05" and format_eta(0) == "0:00:00"

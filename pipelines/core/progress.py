"""A run's progress in rows, for the whole job (not per Ray Data operator): on a terminal one tqdm bar (done / total,
rows/s, ETA, counts by status); without one - a log file, `ray job submit` - the same facts as a log line every
`every_s` seconds, so log files never get carriage returns."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from . import columns as S

logger = logging.getLogger(__name__)


def format_statuses(statuses: Mapping[str, int]) -> str:
    """`3 ok, 1 blocked, 2 error`: ok first and error last (always shown), other statuses by name between."""
    others = sorted(k for k in statuses if k not in (S.STATUS_OK, S.STATUS_ERROR))
    return ", ".join(f"{statuses.get(k, 0)} {k}" for k in (S.STATUS_OK, *others, S.STATUS_ERROR))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RowProgress:
    """Call `update(rows, statuses)` as rows get written and `close()` at the end. `bar`: None -> a bar only when
    `stream` (default stderr) is a terminal."""

    def __init__(self, total: int, unit: str = "rows", every_s: float = 30.0, job: str = "job",
                 bar: bool | None = None, stream: IO[str] | None = None) -> None:
        self.total, self.unit, self.every_s, self.job = total, unit, every_s, job
        self.done = 0
        self.statuses: dict[str, int] = {}
        self.started = self.last_log = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit.rstrip("s") or unit, desc=job, file=stream, dynamic_ncols=True,
                             smoothing=0.1)
            self._bar.set_postfix_str(format_statuses(self.statuses))
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log records written while the bar is shown go above it instead of through it
            self._redirect: Any = logging_redirect_tqdm()
            self._redirect.__enter__()

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.started)

    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (f"progress: {self.done}/{self.total} {self.unit} ({share:.0f}%), {format_statuses(self.statuses)}, "
                f"{self.rate:.2f} {self.unit}/s, ETA {format_eta(self.eta_s())}")

    def update(self, rows: int, statuses: Mapping[str, int]) -> None:
        self.done += rows
        for status, n in statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        if self._bar is not None:
            self._bar.set_postfix_str(format_statuses(self.statuses), refresh=False)
            self._bar.update(rows)
        elif time.monotonic() - self.last_log >= self.every_s:
            self.last_log = time.monotonic()
            logger.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
            self._bar = None

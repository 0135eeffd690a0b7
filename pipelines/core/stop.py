"""Preemption and Ctrl-C: what the driver does on SIGTERM (Kubernetes deleting a pod, a spot node going away) and
SIGINT (Ctrl-C in a terminal) - the same clean stop, told apart only by the exit status (3 and 130, the shell's
128 + SIGINT). A second Ctrl-C does not wait for the clean stop: it runs the clean-ups and exits 130 at once.

`install()` (called by `jobs/jobcli.py`) makes SIGTERM and SIGINT set `requested`. The driver checks it where stopping is
clean: the streaming loop (`runner.execute`) after each written data file raises `StopRequested`, and Ray Data tears
the execution down (the data files written so far stay, each with its checkpoint; a partial one is deleted on
resume); the incremental loop checks it between input files (a file being merged finishes with its manifest entry).
The handler itself never raises: an exception thrown into Ray's C++ iterator surfaces as a SystemError. A watchdog
ends the process with `EXIT_STOPPED` if the clean stop takes longer than `grace_s` (Kubernetes' default grace period
is 30 s, then SIGKILL), after the clean-ups registered with `on_timeout` (the lease release).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

EXIT_STOPPED = 3  # stopped on SIGTERM; the same command resumes
EXIT_INTERRUPTED = 130  # stopped on SIGINT (Ctrl-C); the same command resumes
DEFAULT_GRACE_S = 25.0

requested = threading.Event()
_state: dict[str, Any] = {"interruptible": 0, "watchdog": False, "signal": "SIGTERM"}
_on_timeout: list[Callable[[], None]] = []  # best-effort clean-ups before the watchdog exits (lease release)


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived: stop taking new work (a BaseException, so that `except Exception` blocks let it
    pass)."""


def signal_name() -> str:
    """The signal that asked for the stop: SIGTERM or SIGINT."""
    return str(_state["signal"])


def exit_status() -> int:
    """The exit status of a stopped run: 130 after Ctrl-C, else 3."""
    return EXIT_INTERRUPTED if _state["signal"] == "SIGINT" else EXIT_STOPPED


def check() -> None:
    """Raise StopRequested if a stop was requested (call at unit boundaries)."""
    if requested.is_set():
        raise StopRequested(f"stopped on {signal_name()}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A section that stops at its next check once a stop was requested (checked on entry too)."""
    check()
    _state["interruptible"] += 1
    try:
        yield
    finally:
        _state["interruptible"] -= 1


def on_timeout(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a clean-up the watchdog runs before it exits; returns a function that unregisters it."""
    _on_timeout.append(fn)
    return lambda: _on_timeout.remove(fn) if fn in _on_timeout else None


def _run_clean_ups() -> None:
    for fn in list(_on_timeout):
        try:
            fn()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _watchdog(grace_s: float) -> None:
    if requested.wait(timeout=None) and not _done.wait(grace_s):
        logger.error("stop: not finished %.0f s after %s; exiting with status %d", grace_s, signal_name(),
                     exit_status())
        _run_clean_ups()
        os._exit(exit_status())


_done = threading.Event()


def finished() -> None:
    """The clean stop is complete (the watchdog stands down)."""
    _done.set()


def install(grace_s: float = DEFAULT_GRACE_S) -> None:
    """Handle SIGTERM and SIGINT in this (main) thread as described in the module docstring."""

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not requested.is_set():
            _state["signal"] = name
            requested.set()
            logger.warning("stop: %s received - no new work; finishing or discarding what is in flight%s", name,
                           " (Ctrl-C again to exit at once)" if name == "SIGINT" else "")
        elif name == "SIGINT":  # the user does not want to wait for the clean stop
            logger.warning("stop: second Ctrl-C - exiting now; rerun the same command to resume")
            _run_clean_ups()
            os._exit(EXIT_INTERRUPTED)

    # Ray's core worker installs its own SIGTERM handler (it aborts the process) when the driver connects: call
    # install() again after ray.init - it replaces the handler and starts the watchdog only once
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if not _state.get("watchdog"):
        _state["watchdog"] = True
        threading.Thread(target=_watchdog, args=(grace_s,), name="stop-watchdog", daemon=True).start()

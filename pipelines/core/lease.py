"""One run per output at a time: a lease on `--output`, held as the object `<output>/_lock`.

The lock is a small JSON document: holder (user@host:pid), host, pid, a random token, start, expiry. The holder
renews the expiry every `ttl/3` seconds from a thread while the run lasts and deletes the lock at the end.

* Taking it: create `_lock` only if it does not exist - locally `O_CREAT | O_EXCL`, on S3 a conditional PUT
  (`If-None-Match: *`); where a store ignores the condition the re-read below still catches a lost race. Then the
  lock is read back: we hold it only if it carries our token.
* Someone else's lock: the run is refused (`LeaseHeld`, exit status 2) with a message naming the holder, unless
  the holder is gone - a process of THIS host whose pid no longer exists (a crash or a kill: rerunning right after
  must just work), or any holder whose lease expired (another host: we cannot see its processes). A lock taken over
  is overwritten, read back after a short pause (a concurrent taker's write would show) and logged.
* Renewing checks the token first: a lease that was taken over (this process stalled past its expiry) is reported
  as lost, and the run stops at the next file boundary (`Lease.lost`).

Scheduled runs overlap when one is slow (RayCronJob has no concurrency policy): this is what keeps them from
writing the same output at once.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from . import stop
from .storage import Location, with_retries

logger = logging.getLogger(__name__)

LOCK_FILE = "_lock"
DEFAULT_TTL_S = 300.0
TAKEOVER_SETTLE_S = 0.5  # pause before re-reading a lock we overwrote: a concurrent taker's PUT lands in between


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease (refused before any work: exit status 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


class Lease:
    """The lease of one run on `output` (use as a context manager: acquire on enter, release on exit)."""

    def __init__(self, output: Location, ttl_s: float = DEFAULT_TTL_S, job: str = "job") -> None:
        self.output, self.ttl_s, self.job = output, float(ttl_s), job
        self.lock = output.child(LOCK_FILE)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_folder = False

    # ---- the document ------------------------------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        now = time.time()
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        return {"holder": f"{user}@{self.host}:{self.pid}", "host": self.host, "pid": self.pid, "job": self.job,
                "token": self.token, "started": _when(self.started), "started_ts": self.started,
                "renewed": _when(now), "expires": _when(now + self.ttl_s), "expires_ts": now + self.ttl_s}

    def read(self) -> dict[str, Any] | None:
        try:
            data = self.lock.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {"holder": "?", "expires_ts": 0.0}  # unreadable (a torn local write): treat as expired

    def _create(self, data: bytes) -> bool:
        """Create the lock only if absent; False when it exists."""
        if self.output.is_local:
            os.makedirs(self.output.path, exist_ok=True)
            try:
                fd = os.open(self.lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        bucket, _, key = self.lock.path.partition("/")

        def put() -> bool:
            try:
                self.lock.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:  # s3fs maps 412 on If-None-Match to FileExistsError
                return False
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc) or "ConditionalRequestConflict" in str(exc):
                    return False
                raise
            return True

        created = with_retries(put, f"create {self.lock.uri}")
        self.lock.fs.invalidate_cache(self.lock.path)
        return created

    def _mine(self) -> bool:
        current = self.read()
        return current is not None and current.get("token") == self.token

    # ---- acquire / renew / release -----------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        existed = self.output.exists()
        data = json.dumps(self.document(), indent=1).encode()
        for _ in range(3):
            if self._create(data):
                if self._mine():
                    break
                continue  # a taker overwrote it right away: look again
            current = self.read()
            if current is None:
                continue  # released between our create and read: try again
            why = self._stale(current)
            if why is None:
                raise LeaseHeld(
                    f"--output {self.output.uri} is in use by another run: {current.get('holder', '?')} "
                    f"(job {current.get('job', '?')}, started {current.get('started', '?')}, lease expires "
                    f"{current.get('expires', '?')}). Only one run per output at a time; if that run is gone, its "
                    f"lease is taken over once it expires (--lease-ttl-s), or delete {self.lock.uri}.")
            self.lock.write_bytes_atomic(data)
            time.sleep(TAKEOVER_SETTLE_S)
            if self._mine():
                self.took_over = current
                logger.warning("lease: took over %s from %s (%s)", self.lock.uri, current.get("holder", "?"), why)
                break
        else:
            current = self.read() or {}
            raise LeaseHeld(f"--output {self.output.uri}: could not take the lease {self.lock.uri} (another run "
                            f"took it first: {current.get('holder', '?')})")
        self._created_folder = self.output.is_local and not existed
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()
        self._unregister = stop.on_timeout(self.release)  # a stop that overruns its grace still frees the output
        logger.info("lease: holding %s (expires after %.0f s without renewal)", self.lock.uri, self.ttl_s)
        return self

    def _stale(self, current: dict[str, Any]) -> str | None:
        """Why the holder of `current` is gone (then its lease may be taken over), or None while it is alive."""
        if current.get("host") == self.host and isinstance(current.get("pid"), int):
            if current["pid"] == self.pid:
                return "a lease of this very process, left over"
            if not _pid_alive(current["pid"]):
                return f"its process {current['pid']} on this host no longer exists"
        if float(current.get("expires_ts", 0.0)) < time.time():
            return f"its lease expired at {current.get('expires', '?')}"
        return None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._mine():
                    self.lost = True
                    logger.error("lease: %s was taken over by another run; stopping at the next file boundary",
                                 self.lock.uri)
                    return
                self.lock.write_bytes_atomic(json.dumps(self.document(), indent=1).encode())
            except Exception as exc:  # noqa: BLE001 - keep trying: the lease lasts ttl_s from the last renewal
                logger.warning("lease: could not renew %s: %s: %s", self.lock.uri, type(exc).__name__, exc)

    def release(self) -> None:
        if getattr(self, "_unregister", None):
            self._unregister()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._mine():
                self.lock.delete()
            if self._created_folder and os.path.isdir(self.output.path) and not os.listdir(self.output.path):
                os.rmdir(self.output.path)  # the run created the folder only to hold its lock: leave nothing
        except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
            logger.warning("lease: could not release %s: %s: %s", self.lock.uri, type(exc).__name__, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

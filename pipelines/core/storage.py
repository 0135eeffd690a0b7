"""Local paths and s3:// URIs behind one small interface (fsspec: s3fs for S3).

S3 settings come from the standard AWS environment variables (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION) and/or `--storage-options`. They are
resolved ONCE on the driver into explicit s3fs options, and those options travel with every stage (inside the
pickled filesystem objects and stage arguments). Why: Ray workers do not inherit the driver's environment - on a
cluster they are started by each node's raylet - so a worker that rebuilt s3fs from its own environment would talk
to AWS instead of the endpoint the user configured.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

logger = logging.getLogger(__name__)

IO_THREADS = 16  # concurrent small reads (footers, headers, checkpoints) against object storage

# env var -> s3fs option (first match wins for the endpoint)
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
_REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# what a job forwards to workers' environments as well (anything using botocore directly)
AWS_ENV_VARS = (*_ENDPOINT_VARS, *_CREDENTIAL_VARS, *_REGION_VARS)


# Transient storage faults (S3 503 SlowDown, connection resets, timeouts) are retried at two levels: botocore's
# "standard" retry mode inside s3fs (exponential backoff with jitter, every request of every process, Ray workers
# included, since the options travel with the stages), and `with_retries` around each operation the jobs make on
# their own (listing, bookkeeping reads and writes, data file writes), so a fault that outlasts botocore's attempts
# is tried again later instead of failing the run. Permanent errors (403, a missing bucket or key) are not retried.
BOTO_RETRIES = {"max_attempts": 10, "mode": "standard"}
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.2
RETRY_CAP_S = 8.0
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                     errno.EINVAL, errno.ENOSPC}
_TRANSIENT_WORDS = ("slowdown", "slow down", "reduce your request rate", "serviceunavailable", "service unavailable",
                    "internalerror", "requesttimeout", "throttl", "connection", "timed out", "timeout",
                    "temporarily", "reset by peer", "broken pipe", "503", "500", "502", "504")
T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed for good (a permanent error, or a transient one that outlasted every retry)."""


def is_transient(exc: BaseException) -> bool:
    """A fault worth retrying: timeouts, connection errors, throttling and 5xx answers - not 403/404/412."""
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    module = type(exc).__module__
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, OSError) or module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs",
                                                      "fsspec")):
        return any(word in text for word in _TRANSIENT_WORDS)
    return False


def with_retries(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """`fn()`, retried on transient faults with exponential backoff and full jitter (so that many workers hitting
    the same throttled prefix do not retry in lockstep)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc) or attempt == attempts:
                raise
            delay = random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt))
            logger.warning("storage: %s failed (%s: %s), retry %d/%d in %.2f s", what, type(exc).__name__,
                           str(exc)[:200], attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def storage_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    for var in _ENDPOINT_VARS:
        if environ.get(var):
            options["endpoint_url"] = environ[var]
            break
    for var, key in _CREDENTIAL_VARS.items():
        if environ.get(var):
            options[key] = environ[var]
    for var in _REGION_VARS:
        if environ.get(var):
            options["client_kwargs"] = {"region_name": environ[var]}
            break
    return options


def resolve_storage_options(explicit: Mapping[str, Any] | None = None,
                            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Environment-derived options, overridden key by key by `explicit` (`--storage-options`)."""
    options = storage_options_from_env(environ)
    for key, value in (explicit or {}).items():
        if key == "client_kwargs" and isinstance(value, Mapping):
            options["client_kwargs"] = {**options.get("client_kwargs", {}), **value}
        else:
            options[key] = value
    return options


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A folder/prefix or file: `uri` as the user wrote it (local paths made absolute), `path` as fsspec wants it
    (no protocol), and the filesystem. Picklable: s3fs pickles its constructor options."""

    uri: str
    path: str
    fs: Any = field(repr=False, compare=False)

    @property
    def protocol(self) -> str:
        return self.uri.split("://", 1)[0] if is_remote(self.uri) else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def child(self, *names: str) -> "Location":
        path = posixpath.join(self.path, *names) if not self.is_local else os.path.join(self.path, *names)
        return Location(uri=self.uri_of(path), path=path, fs=self.fs)

    def uri_of(self, path: str) -> str:
        """The URI of an fsspec path on this filesystem (s3fs paths are `bucket/key`)."""
        return path if self.is_local else f"{self.protocol}://{path}"

    # ---- I/O -----------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)  # s3fs caches listings; other processes write here
        return bool(with_retries(lambda: self.fs.exists(self.path), f"exists {self.uri}"))

    def isdir(self) -> bool:
        return bool(with_retries(lambda: self.fs.isdir(self.path), f"isdir {self.uri}"))

    def read_bytes(self) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path), f"read {self.uri}")

    def write_bytes_atomic(self, data: bytes) -> None:
        """The file appears complete or not at all: locally a temp file in the same folder + os.replace (named
        `_tmp-*`, so readers skip it and resume deletes leftovers); on S3 a single PUT is already atomic."""
        if self.is_local:
            folder = os.path.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f"_tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with_retries(lambda: self.fs.pipe_file(self.path, data), f"write {self.uri}")

    def delete(self) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

        with_retries(rm, f"delete {self.uri}")

    def list_files(self, recursive: bool = False) -> list[str]:
        """fsspec paths of the files under this folder ([] if it does not exist)."""
        if not self.exists():
            return []
        if recursive:
            return sorted(with_retries(lambda: self.fs.find(self.path), f"list {self.uri}"))
        entries = with_retries(lambda: self.fs.ls(self.path, detail=True), f"list {self.uri}")
        return sorted(p["name"] for p in entries if p.get("type") == "file")

    def list_details(self) -> dict[str, dict[str, Any]]:
        """{fsspec path: info (size, ETag or mtime, ...)} of every file below this folder, from one fresh listing
        ({} if it does not exist)."""
        self.fs.invalidate_cache(self.path)
        if not self.exists():
            return {}
        return with_retries(lambda: self.fs.find(self.path, detail=True), f"list {self.uri}")


def canonical_uri(uri: str) -> str:
    """One spelling per place: local paths absolute (`~` expanded, `file://` dropped, no trailing slash), remote
    URIs without a trailing slash. `data/x`, `./data/x/` and `/abs/data/x` name the same input."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        protocol, rest = uri.split("://", 1)
        return f"{protocol}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(uri))


def locate(uri: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """A Location for a local path (made absolute; `file://` accepted) or a remote URI (s3://, ...)."""
    uri = canonical_uri(uri)
    if is_remote(uri):
        protocol, path = uri.split("://", 1)
        options = dict(storage_options or {}) if protocol in ("s3", "s3a") else {}
        if protocol in ("s3", "s3a"):
            options.setdefault("config_kwargs", {"retries": dict(BOTO_RETRIES)})  # --storage-options may override
        fs = fsspec.filesystem("s3" if protocol == "s3a" else protocol, **options)
        return Location(uri=uri, path=path, fs=fs)
    return Location(uri=uri, path=uri, fs=fsspec.filesystem("file"))


def relative_key(root: str, path: str) -> str:
    """`path` relative to `root` with `/` separators (both fsspec paths)."""
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path} is not under {root}")
    return path[len(root) + 1:]


def is_hidden(relative: str) -> bool:
    """Bookkeeping and hidden files: any path component starting with `_` or `.` (Spark/Hive convention)."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def expand_input(location: Location, extensions: Iterable[str] | None) -> tuple[str, list[str]]:
    """The files an --input names, as (root folder path, sorted fsspec file paths).

    A file -> itself (root: its folder); a folder -> every file below it with a matching extension, skipping
    hidden/bookkeeping names; otherwise a prefix (`s3://b/data/part-`) -> the matching files that start with it.
    `extensions=None` matches every file. Raises FileNotFoundError when the path is no file, no folder and no
    prefix of any file (a missing bucket included), so that callers can say so instead of "no files found".
    """
    root, infos = expand_input_detailed(location, extensions)
    return root, sorted(infos)


def expand_input_detailed(location: Location, extensions: Iterable[str] | None
                          ) -> tuple[str, dict[str, dict[str, Any]]]:
    """`expand_input` with each file's listing info (size, ETag on S3, mtime locally) from the same listing."""
    exts = None if extensions is None else tuple("." + e.lower().lstrip(".") for e in extensions)

    def wanted(path: str) -> bool:
        return exts is None or path.lower().endswith(exts)

    def call(what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, f"{what} {location.uri}")

    fs, path = location.fs, location.path
    fs.invalidate_cache(path)  # s3fs caches listings per instance: new shards land between runs of one process
    if call("isfile", lambda: fs.isfile(path)):
        info = call("info", lambda: fs.info(path))
        return (os.path.dirname(path) if location.is_local else posixpath.dirname(path)), {path: info}
    if call("isdir", lambda: fs.isdir(path)):
        found = call("list", lambda: fs.find(path, detail=True))
        return path, {p: i for p, i in sorted(found.items()) if wanted(p) and not is_hidden(relative_key(path, p))}
    parent = posixpath.dirname(path) if not location.is_local else os.path.dirname(path)
    # a bucket root has no parent to list (dirname("bucket") == ""): it exists only if isdir said so above
    if not parent or not call("exists", lambda: fs.exists(parent)):
        bucket = path.split("/", 1)[0]
        if not location.is_local and not (parent and call("exists", lambda: fs.exists(bucket))):
            raise FileNotFoundError(f"{location.uri} does not exist (no bucket {bucket!r}, or no access to it)")
        raise FileNotFoundError(f"{location.uri} does not exist")
    # only the parent's entries that start with the prefix are walked, not the whole parent
    under: dict[str, dict[str, Any]] = {}
    for entry in call("list", lambda: fs.ls(parent, detail=True)):
        name = entry["name"].rstrip("/")
        if name.startswith(path):
            if entry.get("type") == "directory":
                under.update(call("list", lambda n=name: fs.find(n, detail=True)))
            else:
                under[name] = entry
    if not under:
        raise FileNotFoundError(f"{location.uri} does not exist (no file, folder or prefix of that name)")
    return parent, {p: i for p, i in sorted(under.items()) if wanted(p) and not is_hidden(relative_key(parent, p))}

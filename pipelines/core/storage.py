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
    URIs without a trailing slash. `data/x`, `./data/x/` and `/abs/data/x` name the same input; each part of a
    `::`-joined --input is spelled so."""
    if SPEC_SEPARATOR in uri:
        return SPEC_SEPARATOR.join(canonical_uri(part) for part in _split_spec(uri))
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


# ---- what an --input names ----------------------------------------------------------------------------------------
SPEC_SEPARATOR = "::"  # several specs in one --input, as the `webdataset` library joins shard lists
_GLOB_CHARS = ("*", "?", "[")


class InputNotFound(FileNotFoundError):
    """An --input spec or one of its expanded names matches nothing (the message names it)."""


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def is_pattern(spec: str) -> bool:
    """Whether an --input is more than one path: `::`-joined, brace-expanded or globbed."""
    return SPEC_SEPARATOR in spec or "{" in spec or _has_glob(spec)


@dataclass
class InputListing:
    """What an --input names: the files read (with their listing info: size, ETag on S3, mtime locally) and the
    files it names but that are not read (another extension), both fsspec paths under `root`. Bookkeeping and hidden
    names (`_*`, `.*`) found in a folder, prefix or glob are in neither."""

    spec: str  # --input as given
    root: Location  # keys and relative paths are relative to this folder
    files: dict[str, dict[str, Any]]  # read: fsspec path -> listing info, sorted by path
    skipped: list[str] = field(default_factory=list)  # named but not read, sorted

    @property
    def paths(self) -> list[str]:
        return list(self.files)

    def relative(self, paths: Iterable[str]) -> list[str]:
        return [relative_key(self.root.path, p) for p in paths]

    @property
    def skipped_names(self) -> list[str]:
        return self.relative(self.skipped)


def _split_spec(spec: str) -> list[str]:
    """`a::b` -> [a, b], empty parts dropped (`s3://` holds no `::`)."""
    return [part for part in spec.split(SPEC_SEPARATOR) if part.strip()]


def _folder_of(path: str, is_local: bool) -> str:
    return os.path.dirname(path) if is_local else posixpath.dirname(path)


def _check_folder(location: Location, folder: str, call: Callable[[str, Callable[[], Any]], Any]) -> None:
    """InputNotFound for `location` when `folder` (what it is looked for in) does not exist, naming a missing
    bucket. A bucket root has no parent to list (dirname("bucket") == ""): it exists only if isdir said so."""
    fs = location.fs
    if folder and call("exists", lambda: fs.exists(folder)):
        return
    bucket = location.path.split("/", 1)[0]
    if not location.is_local and not (folder and call("exists", lambda: fs.exists(bucket))):
        raise InputNotFound(f"{location.uri} does not exist (no bucket {bucket!r}, or no access to it)")
    raise InputNotFound(f"{location.uri} does not exist")


def _list_one(location: Location, literal_only: bool) -> tuple[str, dict[str, dict[str, Any]], bool]:
    """One expanded name -> (its root folder, {path: info} of every file it names, whether it named one file).

    A file -> itself; a folder -> every file below it; a glob (`*`, `?`, `[...]`) -> the files it matches and every
    file below a folder it matches; otherwise a prefix (`s3://b/data/part-`) -> the files that start with it (not for
    a name that came from a brace expansion: that one must exist). A name with glob characters that exists as
    written is taken as written."""

    def call(what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, f"{what} {location.uri}")

    fs, path = location.fs, location.path
    fs.invalidate_cache(path)  # s3fs caches listings per instance: new shards land between runs of one process
    globbed = _has_glob(path)
    if not globbed or call("exists", lambda: fs.exists(path)):
        if call("isfile", lambda: fs.isfile(path)):
            return _folder_of(path, location.is_local), {path: call("info", lambda: fs.info(path))}, True
        if call("isdir", lambda: fs.isdir(path)):
            return path, dict(call("list", lambda: fs.find(path, detail=True))), False
    if globbed:
        # the folder above the first glob character: what relative names and hidden parts are judged from
        root = _folder_of(path[:min(path.index(c) for c in _GLOB_CHARS if c in path)] + "x", location.is_local)
        if not root:
            raise ValueError(f"{location.uri}: a glob in the bucket name is not supported")
        fs.invalidate_cache(root)
        found: dict[str, dict[str, Any]] = {}
        for name, info in call("glob", lambda: fs.glob(path, detail=True)).items():
            if info.get("type") == "directory":
                found.update(call("list", lambda n=name: fs.find(n, detail=True)))
            else:
                found[name] = info
        if not found:
            _check_folder(location, root, call)
            raise InputNotFound(f"{location.uri} matches no file")
        return root, found, False
    parent = _folder_of(path, location.is_local)
    _check_folder(location, parent, call)
    if literal_only:
        raise InputNotFound(f"{location.uri} does not exist")
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
        raise InputNotFound(f"{location.uri} does not exist (no file, folder or prefix of that name)")
    return parent, under, False


def list_input_files(spec: str, storage_options: Mapping[str, Any] | None,
                     extensions: Iterable[str] | None) -> InputListing:
    """Every file an --input names, split into the files read and the files skipped.

    `spec` is what the `webdataset` library accepts for shards: a path or URI, brace ranges and lists
    (`shard-{000000..000099}.tar`, `{a,b}`, expanded with `braceexpand`), globs (`*`, `?`, `[...]`, fsspec's glob),
    several specs joined with `::` - each a file, a folder or a prefix as well. A file named directly (not through a
    folder, prefix or glob) is read whatever its extension; other files are read when their name ends with one of
    `extensions` (None: every file; compound ones such as `tar.gz` work), skipped when it does not, and dropped
    silently when a part of their path below the root starts with `_` or `.` (bookkeeping). Raises
    InputNotFound naming the spec or expanded name that matches nothing (a missing bucket included), and
    ValueError for specs that do not share one filesystem and one root folder."""
    from braceexpand import braceexpand  # ships with webdataset

    exts = None if extensions is None else tuple("." + e.lower().lstrip(".") for e in extensions)
    names: list[tuple[str, str, bool]] = []  # (expanded name, the spec it came from, from a brace expansion)
    literal = locate(spec, storage_options) if is_pattern(spec) and SPEC_SEPARATOR not in spec else None
    if literal is not None and with_retries(lambda: literal.fs.exists(literal.path), f"exists {literal.uri}"):
        names.append((spec, spec, False))  # a file or folder whose name holds `{`, `*`, ... as written
    for part in ([] if names else _split_spec(spec)):
        expanded = list(braceexpand(part))
        names += [(name, part, len(expanded) > 1 or name != part) for name in expanded]
    if not names:
        raise InputNotFound(f"--input {spec!r} names no path")
    located = [locate(name, storage_options) for name, _, _ in names]
    if len({loc.protocol for loc in located}) > 1:
        raise ValueError(f"--input {spec!r} mixes filesystems ({', '.join(sorted({l.protocol for l in located}))}); "
                         "one input lives on one filesystem")
    roots: list[str] = []
    read: dict[str, dict[str, Any]] = {}
    skipped: set[str] = set()
    for location, (name, part, braced) in zip(located, names):
        try:
            root, found, named = _list_one(location, literal_only=braced)
        except InputNotFound as exc:
            raise InputNotFound(str(exc) if name == part else f"{exc} (from --input {part!r})") from None
        roots.append(root)
        for path, info in found.items():
            if named or (not is_hidden(relative_key(root, path)) and (exts is None or path.lower().endswith(exts))):
                read[path] = info
            elif not is_hidden(relative_key(root, path)):
                skipped.add(path)
    first = located[0]
    join = os.path.commonpath if first.is_local else posixpath.commonpath
    common = join(roots) if len(roots) > 1 else roots[0]
    if not common:  # two buckets
        raise ValueError(f"--input {spec!r}: its specs share no folder; one input lives in one bucket")
    skipped -= set(read)  # named directly by one spec, found in a folder by another
    root = Location(first.uri_of(common), common, first.fs)
    return InputListing(spec, root, dict(sorted(read.items())), sorted(skipped))

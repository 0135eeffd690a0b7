"""Local paths and s3:// URIs behind one small interface (fsspec: s3fs for S3).

S3 settings come from the standard AWS environment variables (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION) and/or `--storage-options`. They are
resolved ONCE on the driver into explicit s3fs options, and those options travel with every stage (inside the
pickled filesystem objects and stage arguments). Why: Ray workers do not inherit the driver's environment - on a
cluster they are started by each node's raylet - so a worker that rebuilt s3fs from its own environment would talk
to AWS instead of the endpoint the user configured.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

IO_THREADS = 16  # concurrent small reads (footers, headers, checkpoints) against object storage

# env var -> s3fs option (first match wins for the endpoint)
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
_REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# what a job forwards to workers' environments as well (anything using botocore directly)
AWS_ENV_VARS = (*_ENDPOINT_VARS, *_CREDENTIAL_VARS, *_REGION_VARS)


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
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

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
            self.fs.pipe_file(self.path, data)

    def delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def list_files(self, recursive: bool = False) -> list[str]:
        """fsspec paths of the files under this folder ([] if it does not exist)."""
        if not self.exists():
            return []
        if recursive:
            return sorted(self.fs.find(self.path))
        return sorted(p["name"] for p in self.fs.ls(self.path, detail=True) if p.get("type") == "file")


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
    exts = None if extensions is None else tuple("." + e.lower().lstrip(".") for e in extensions)

    def wanted(path: str) -> bool:
        return exts is None or path.lower().endswith(exts)

    fs, path = location.fs, location.path
    if fs.isfile(path):
        return (os.path.dirname(path) if location.is_local else posixpath.dirname(path)), [path]
    if fs.isdir(path):
        files = [p for p in fs.find(path) if wanted(p) and not is_hidden(relative_key(path, p))]
        return path, sorted(files)
    parent = posixpath.dirname(path) if not location.is_local else os.path.dirname(path)
    # a bucket root has no parent to list (dirname("bucket") == ""): it exists only if isdir said so above
    if not parent or not fs.exists(parent):
        bucket = path.split("/", 1)[0]
        if not location.is_local and not (parent and fs.exists(bucket)):
            raise FileNotFoundError(f"{location.uri} does not exist (no bucket {bucket!r}, or no access to it)")
        raise FileNotFoundError(f"{location.uri} does not exist")
    # only the parent's entries that start with the prefix are walked, not the whole parent
    under: list[str] = []
    for entry in fs.ls(parent, detail=True):
        name = entry["name"].rstrip("/")
        if name.startswith(path):
            under += fs.find(name) if entry.get("type") == "directory" else [name]
    if not under:
        raise FileNotFoundError(f"{location.uri} does not exist (no file, folder or prefix of that name)")
    files = [p for p in under if wanted(p) and not is_hidden(relative_key(parent, p))]
    return parent, sorted(files)

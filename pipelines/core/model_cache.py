"""Model folders for the model actors: checked on the driver before any work (`check_model_folders`), their
`viscpm_config.json` read there without the weights (`read_model_config`), and `s3://` prefixes downloaded once per
node (`local_model_folder`).

Every actor on a node takes the same file lock (fcntl) on `<cache>/<hash>.lock`; the first downloads into a
temporary folder and renames it into place, the others wait on the lock and find the finished folder. The weights
are then opened by the model's `from_pretrained` (memory-mapped).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .inputs import InputError
from .storage import Location, is_remote, locate, relative_key

logger = logging.getLogger(__name__)

DONE_MARKER = ".download-complete"


def default_cache_dir() -> Path:
    return Path(os.environ.get("VISCPM_CACHE_DIR") or Path.home() / ".cache" / "viscpm-batch" / "models")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def fetch_model_folder(uri: str, storage_options: Mapping[str, Any] | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """Download the files under `uri` (an s3:// prefix) once per node; return the local folder.

    The folder is `<cache>/<sha256(uri)[:16]>/<basename>`, so the model keeps its name. A folder with the
    completion marker is reused as is (delete it to force a new download)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    source = locate(uri, storage_options)
    digest = hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    basename = source.path.rstrip("/").rsplit("/", 1)[-1] or "model"
    target = cache / digest / basename
    with file_lock(cache / f"{digest}.lock"):
        if (target / DONE_MARKER).is_file():
            logger.info("model %s already in the node cache at %s", source.uri, target)
            return target
        files = source.list_files(recursive=True)
        if not files:
            raise FileNotFoundError(f"no files under model prefix {source.uri}")
        staging = cache / digest / f".staging-{uuid.uuid4().hex}"
        started = time.monotonic()
        total = 0
        for remote in files:
            rel = remote[len(source.path.rstrip("/")) + 1:]
            local = staging / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            source.fs.get_file(remote, str(local))
            total += local.stat().st_size
        (staging / DONE_MARKER).write_text(source.uri)
        if target.exists():  # an interrupted earlier download without marker
            shutil.rmtree(target)
        os.replace(staging, target)
        logger.info("downloaded model %s (%d files, %.1f MB) to %s in %.1f s", source.uri, len(files),
                    total / 1e6, target, time.monotonic() - started)
        return target


def _folder_files(location: Location) -> list[str] | None:
    """Relative names of the files directly in a folder/prefix; None when there is nothing there."""
    if not location.exists():
        return None
    return [relative_key(location.path, p) for p in location.list_files()]


def check_model_folders(sources: Sequence[tuple[str, str | None, str]],
                        storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse (InputError) model folders the actors could not load - missing, or without the files the model needs
    - before any GPU is reserved, with the loader's own message. `sources`: (flag, folder or preset, kind) as the
    job configs' `model_sources()` give them."""
    from viscpm import MODEL_PRESETS, model_folder_problem

    problems = []
    for flag, spec, kind in sources:
        if spec is None or spec in MODEL_PRESETS:
            continue
        try:
            location = locate(spec, storage_options)
            problem = model_folder_problem(kind, _folder_files(location), location.uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable bucket, no permission, ...: say which and why
            problem = f"cannot list {spec}: {type(exc).__name__}: {exc}"
        if problem:
            problems.append(f"{flag}: {problem}")
    if problems:
        raise InputError("; ".join(problems))


def read_model_config(spec: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The `viscpm_config.json` of a model folder or `s3://` prefix, as a dict; None when it has none (an original
    checkpoint). Reads that one small file, never the weights."""
    from viscpm import CONFIG_FILE

    try:
        data = locate(spec, storage_options).child(CONFIG_FILE).read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(data)


def local_model_folder(spec: str | None, storage_options: Mapping[str, Any] | None = None,
                       cache_dir: str | Path | None = None) -> str | None:
    """A model spec as `from_pretrained` takes it: presets and local folders as they are, `s3://` prefixes
    downloaded into the node's cache first."""
    if spec is None or not is_remote(spec):
        return spec
    return str(fetch_model_folder(spec, storage_options, cache_dir))

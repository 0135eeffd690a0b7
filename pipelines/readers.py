"""Inputs: plan (list files, check columns, collect and check every id - before any work), then read with Ray Data
and normalise every format to the same columns:

    key (string), question (string), status ('ok'), error_message (null unless the row is already known bad),
    __image (bytes or null), __image_path (string or null), <keep columns>

Formats:
* parquet - `--image-column` holds bytes (binary) or paths/URIs (string); `--id-column` the id.
* webdataset - `.tar` shards read raw (`decoder=None`: we decode ourselves, with per-row errors); the id is
  `__key__`; the image is `--image-key` or the first of jpg/jpeg/png/webp present.
* images - image files under a folder/prefix; the id is the path relative to it.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .stages import Column, Stage
from .storage import Location, expand_input, locate, relative_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IO_THREADS = 16
SAMPLE = 10
# WebDataset's own rule (and Ray's `read_webdataset`): the key is the member name up to the first '.' of its base
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class InputError(ValueError):
    """The input cannot be processed as configured (missing columns, bad or duplicate ids, no files)."""


@dataclass
class InputPlan:
    input_format: str
    root: Location  # keys and relative image paths are relative to this folder
    files: list[str]  # fsspec paths
    keys: pa.Array  # every id, as strings, unique
    keep_fields: list[pa.Field] = field(default_factory=list)
    image_is_path: bool = False  # parquet: the image column holds paths/URIs

    def ray_paths(self) -> list[str]:
        return list(self.files)

    def ray_filesystem(self) -> Any:
        """None for local files (Ray's default), else the fsspec filesystem (Ray wraps it; it pickles its options)."""
        return None if self.root.is_local else self.root.fs


# ---- planning ----------------------------------------------------------------------------------------------------
def _check_unique(keys: pa.Array, what: str) -> None:
    if len(keys) == 0:
        return
    nulls = keys.null_count
    if nulls:
        raise InputError(f"{nulls} rows have no id ({what}): every row needs one")
    empty = pc.sum(pc.equal(pc.utf8_length(keys), 0)).as_py() or 0
    if empty:
        raise InputError(f"{empty} rows have an empty id ({what}): ids must be non-empty")
    counts = pc.value_counts(keys)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dup:
        shown = ", ".join(repr(d) for d in sorted(dup)[:SAMPLE])
        raise InputError(f"{len(dup)} ids occur more than once ({what}): {shown}"
                         f"{' ...' if len(dup) > SAMPLE else ''}. Ids must be unique.")


def id_to_key(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The one conversion from an id column to `key` (used by the plan and by the reader, so they agree)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_string(values.type):
        return values
    return pc.cast(values, pa.string())


def _parquet_file_info(location: Location, path: str, config: Any) -> tuple[pa.Schema, pa.Array]:
    with location.fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        schema = pf.schema_arrow
        wanted = [config.id_column, config.image_column, *( [config.question_column] if config.question_column
                                                           else []), *config.keep_columns]
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InputError(f"{location.uri_of(path)}: missing column(s) {missing} (--id-column/--image-column/"
                             f"--question-column/--keep-columns). Available columns: {schema.names}")
        ids = pf.read(columns=[config.id_column]).column(0)
    return schema, id_to_key(ids)


def _plan_parquet(config: Any, location: Location) -> InputPlan:
    root, files = expand_input(location, ["parquet"])
    if not files:
        raise InputError(f"no .parquet files found at {location.uri}")
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        infos = list(pool.map(lambda p: _parquet_file_info(location, p, config), files))
    schema = infos[0][0]
    image_type = schema.field(config.image_column).type
    if pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type):
        image_is_path = False
    elif pa.types.is_string(image_type) or pa.types.is_large_string(image_type):
        image_is_path = True
    else:
        raise InputError(f"--image-column {config.image_column!r} has type {image_type}: expected binary (image "
                         "bytes) or string (paths/URIs)")
    keys = pa.concat_arrays([k for _, k in infos]) if len(infos) > 1 else infos[0][1]
    _check_unique(keys, f"--id-column {config.id_column!r}")
    keep = [schema.field(c) for c in config.keep_columns]
    return InputPlan("parquet", Location(location.uri_of(root), root, location.fs), files, keys, keep, image_is_path)


def tar_keys(location: Location, path: str) -> list[str]:
    """The sample keys of one shard, from the tar headers (seeking past the member data)."""
    keys: list[str] = []
    seen: set[str] = set()
    with location.fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            m = _WDS_KEY.match(info.name)
            if not m:
                continue
            key = m.group(1)
            if keys and keys[-1] == key:
                continue
            if key in seen:
                raise InputError(f"{location.uri_of(path)}: members of sample {key!r} are not contiguous (or the key "
                                 "occurs twice in the shard); WebDataset needs each sample's files next to each other")
            seen.add(key)
            keys.append(key)
    return keys


def _plan_webdataset(config: Any, location: Location) -> InputPlan:
    root, files = expand_input(location, ["tar"])
    if not files:
        raise InputError(f"no .tar shards found at {location.uri}")
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        per_shard = list(pool.map(lambda p: tar_keys(location, p), files))
    keys = pa.array([k for shard in per_shard for k in shard], pa.string())
    _check_unique(keys, "WebDataset __key__")
    keep = [pa.field(c, pa.binary()) for c in config.keep_columns]
    return InputPlan("webdataset", Location(location.uri_of(root), root, location.fs), files, keys, keep)


def _plan_images(config: Any, location: Location) -> InputPlan:
    root, files = expand_input(location, IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found at {location.uri}")
    keys = pa.array([relative_key(root, f) for f in files], pa.string())
    _check_unique(keys, "relative paths")
    return InputPlan("images", Location(location.uri_of(root), root, location.fs), files, keys)


def plan_input(config: Any, storage_options: Mapping[str, Any] | None = None) -> InputPlan:
    """List the input, check its columns and ids; raises InputError naming the problem before any work starts."""
    location = locate(config.input, storage_options)
    planner = {"parquet": _plan_parquet, "webdataset": _plan_webdataset, "images": _plan_images}[config.input_format]
    plan = planner(config, location)
    logger.info("input %s: %d %s files, %d rows", location.uri, len(plan.files), plan.input_format, len(plan.keys))
    return plan


# ---- normalising (first stage after the read) ---------------------------------------------------------------------
def _column_or_nulls(batch: pa.Table, name: str | None, typ: pa.DataType) -> pa.Array:
    if name and name in batch.column_names:
        col = batch.column(name).combine_chunks()
        return col if col.type == typ else pc.cast(col, typ)
    return pa.nulls(batch.num_rows, typ)


def _bytes_to_text(values: pa.Array) -> pa.Array:
    """Question members of WebDataset samples arrive as bytes."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values
    return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in values.to_pylist()],
                    pa.string())


class NormalizeStage(Stage):
    """Turns one input format's rows into the common columns (see the module docstring)."""

    name = "normalize"
    produces = (
        Column(S.KEY, "row id as a string"),
        Column(S.QUESTION, "question for this row"),
        Column(S.STATUS, "'ok', or 'error' for rows known bad already"),
        Column(S.ERROR, "why a row is bad"),
        Column(S.IMAGE, "encoded image bytes"),
        Column(S.IMAGE_PATH, "path/URI of the image"),
    )

    def __init__(self, input_format: str, question: str, id_column: str = "id", image_column: str = "image",
                 image_is_path: bool = False, image_key: str | None = None, question_column: str | None = None,
                 keep_columns: Sequence[str] = (), root_path: str = "") -> None:
        self.input_format = input_format
        self.question = question
        self.id_column, self.image_column, self.image_is_path = id_column, image_column, image_is_path
        self.image_key, self.question_column = image_key, question_column
        self.keep_columns = list(keep_columns)
        self.root_path = root_path
        self.requires = {
            "parquet": (Column(id_column, "--id-column"), Column(image_column, "--image-column")),
            "webdataset": (Column("__key__", "WebDataset sample key"),),
            "images": (Column("path", "file path (read_binary_files include_paths)"),
                       Column("bytes", "file content")),
        }[input_format]

    def _images(self, batch: pa.Table) -> tuple[pa.Array, pa.Array, list[str | None]]:
        n = batch.num_rows
        errors: list[str | None] = [None] * n
        if self.input_format == "parquet":
            col = batch.column(self.image_column).combine_chunks()
            if self.image_is_path:
                return pa.nulls(n, pa.large_binary()), pc.cast(col, pa.string()), errors
            return pc.cast(col, pa.large_binary()), pa.nulls(n, pa.string()), errors
        if self.input_format == "images":
            return pc.cast(batch.column("bytes").combine_chunks(), pa.large_binary()), pa.nulls(n, pa.string()), errors
        # webdataset: the named member, or the first image suffix present in each sample
        candidates = [self.image_key] if self.image_key else list(WDS_IMAGE_SUFFIXES)
        columns = [(c, batch.column(c).to_pylist()) for c in candidates if c in batch.column_names]
        values: list[bytes | None] = [None] * n
        for i in range(n):
            for _, col in columns:
                if col[i] is not None:
                    values[i] = col[i]
                    break
            else:
                errors[i] = (f"normalize: sample has no image member (looked for {', '.join(candidates)}; "
                             f"columns in this block: {[c for c in batch.column_names if not c.startswith('__')]})")
        return pa.array(values, pa.large_binary()), pa.nulls(n, pa.string()), errors

    def _keys(self, batch: pa.Table) -> pa.Array:
        if self.input_format == "parquet":
            return id_to_key(batch.column(self.id_column))
        if self.input_format == "webdataset":
            return id_to_key(batch.column("__key__"))
        return pa.array([relative_key(self.root_path, p) for p in batch.column("path").to_pylist()], pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        n = batch.num_rows
        image, image_path, errors = self._images(batch)
        if self.question_column and self.question_column in batch.column_names:
            questions = pc.cast(_bytes_to_text(batch.column(self.question_column).combine_chunks()), pa.string())
            missing = pc.or_kleene(pc.is_null(questions), pc.equal(pc.utf8_length(questions), 0))
            questions = pc.if_else(missing, pa.scalar(self.question), questions)
        else:
            questions = pa.array([self.question] * n, pa.string())
        status = [S.STATUS_OK if e is None else S.STATUS_ERROR for e in errors]
        columns = {S.KEY: self._keys(batch), S.QUESTION: questions, S.STATUS: pa.array(status, pa.string()),
                   S.ERROR: pa.array(errors, pa.string()), S.IMAGE: image, S.IMAGE_PATH: image_path}
        for name in self.keep_columns:
            columns[name] = _column_or_nulls(batch, name, batch.schema.field(name).type
                                             if name in batch.column_names else pa.binary())
        return pa.table(columns)


class KeyFilter(Stage):
    """Keeps the rows whose key is in (keep=True) / not in (keep=False) a key set shipped once via the object store;
    resume uses it to skip finished ids."""

    name = "resume-filter"
    requires = (Column(S.KEY, "row id"),)

    def __init__(self, keys_ref: Any, keep: bool) -> None:
        self.keys_ref, self.keep = keys_ref, keep
        self._keys: pa.Array | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        if self._keys is None:
            import ray

            self._keys = ray.get(self.keys_ref) if isinstance(self.keys_ref, ray.ObjectRef) else self.keys_ref
        mask = pc.is_in(batch.column(S.KEY), value_set=self._keys)
        return batch.filter(mask if self.keep else pc.invert(mask))


# ---- Ray Data ------------------------------------------------------------------------------------------------------
def read_dataset(plan: InputPlan, config: Any) -> Any:
    """The Ray Dataset of the raw input (before normalising)."""
    import ray.data

    fs = plan.ray_filesystem()
    if plan.input_format == "parquet":
        columns = list(dict.fromkeys([config.id_column, config.image_column,
                                      *([config.question_column] if config.question_column else []),
                                      *config.keep_columns]))
        # select_columns is pushed down into the read: only these columns are fetched
        return ray.data.read_parquet(plan.ray_paths(), filesystem=fs).select_columns(columns)
    if plan.input_format == "webdataset":
        suffixes = [config.image_key] if config.image_key else list(WDS_IMAGE_SUFFIXES)
        suffixes += [c for c in ([config.question_column] if config.question_column else []) + config.keep_columns]
        return ray.data.read_webdataset(plan.ray_paths(), filesystem=fs, decoder=None, suffixes=suffixes)
    return ray.data.read_binary_files(plan.ray_paths(), filesystem=fs, include_paths=True)


def normalize_stage(plan: InputPlan, config: Any) -> NormalizeStage:
    return NormalizeStage(plan.input_format, config.question, id_column=config.id_column,
                          image_column=config.image_column, image_is_path=plan.image_is_path,
                          image_key=config.image_key, question_column=config.question_column,
                          keep_columns=config.keep_columns, root_path=plan.root.path)

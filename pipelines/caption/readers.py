"""Inputs: plan (list files, check columns, collect and check every id - before any work), then read with Ray Data
and normalise every format to the same columns:

    key (string), question (string), status ('ok'), error_message (null unless the row is already known bad),
    __image (bytes or null), __image_path (string or null), <keep columns>

Formats:
* parquet - `--image-column` holds bytes (binary) or paths/URIs (string); `--id-column` the id.
* webdataset - `.tar` shards read by our own datasource (`WebDatasetShards`): every block has the same schema
  (`__key__`, `__url__`, `__members`, one binary column per wanted member, null where a sample lacks it), so shards
  and samples may differ in their members; bytes only, we decode ourselves with per-row errors. The id is
  `__key__`; the image is `--image-key` or the first of jpg/jpeg/png/webp present. Member suffixes are matched
  case-insensitively (the `webdataset` library lower-cases them).
* images - image files under a folder/prefix; the id is the path relative to it.

Parquet files, too, may differ in optional columns (`--question-column`, `--keep-columns`: null in the files that
lack them); the plan unifies the column types over all files and the read is given that schema, so Ray Data never
has to reconcile blocks of different schemas. The id and image columns are required in every file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.inputs import InputError, check_unique_keys, id_to_key, list_input, not_a
from ..core.stage import SAMPLE, Column, Stage
from ..core.storage import IO_THREADS, InputListing, Location, relative_key
from . import schema as S
from .webdataset import (SHARD_EXTENSIONS, WDS_IMAGE_SUFFIXES, WDS_MEMBERS, WebDatasetShards, tar_keys,
                         webdataset_columns)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
PARQUET_EXTENSIONS = ("parquet",)


@dataclass
class InputPlan:
    input_format: str
    root: Location  # keys and relative image paths are relative to this folder
    files: list[str]  # fsspec paths
    keys: pa.Array  # every id, as strings, unique
    keep_fields: list[pa.Field] = field(default_factory=list)
    image_is_path: bool = False  # parquet: the image column holds paths/URIs
    read_schema: pa.Schema | None = None  # parquet: the columns read, typed alike over all files (absent -> null)
    skipped_files: list[str] = field(default_factory=list)  # named by --input, not read (relative to `root`)

    def ray_paths(self) -> list[str]:
        return list(self.files)

    def ray_filesystem(self) -> Any:
        """None for local files (Ray's default), else the fsspec filesystem (Ray wraps it; it pickles its options)."""
        return None if self.root.is_local else self.root.fs


# ---- planning ----------------------------------------------------------------------------------------------------
def _parquet_file_info(location: Location, path: str, config: Any) -> tuple[pa.Schema, pa.Array]:
    try:
        with location.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            # only the id and the image are required in every file; optional columns are checked over all files
            missing = [c for c in (config.id_column, config.image_column) if c not in schema.names]
            if missing:
                raise InputError(f"{location.uri_of(path)}: missing column(s) {missing} (--id-column/--image-column: "
                                 f"required in every file). Available columns: {schema.names}")
            ids = pf.read(columns=[config.id_column]).column(0)
    except pa.ArrowException as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowInvalid):
            raise InputError(f"{location.uri_of(path)}: cannot read: {type(exc).__name__}: {exc}") from None
        raise not_a(location, path, "a Parquet file", "parquet", exc) from None
    except OSError as exc:
        raise InputError(f"{location.uri_of(path)}: cannot read: {type(exc).__name__}: {exc}") from None
    return schema, id_to_key(ids)


def _column_type(location: Location, column: str, flag: str, per_file: list[tuple[str, pa.DataType]]) -> pa.DataType:
    """One type for a column over the files that have it (Arrow's permissive promotion: null -> anything,
    int32 -> int64, binary -> large_binary, ...); InputError naming the files when there is none."""
    distinct = list(dict.fromkeys(t for _, t in per_file))
    if len(distinct) == 1:
        return distinct[0]
    try:
        return pa.unify_schemas([pa.schema([pa.field(column, t)]) for t in distinct],
                                promote_options="permissive").field(column).type
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        examples = "; ".join(f"{t} in {location.uri_of(next(p for p, u in per_file if u == t))}"
                             for t in distinct[:SAMPLE])
        raise InputError(f"{flag} {column!r} has types that do not combine across the input files: {examples}"
                         ) from None


def _image_type(location: Location, column: str, per_file: list[tuple[str, pa.DataType]]) -> tuple[pa.DataType, bool]:
    """(type to read the image column as, whether it holds paths); every file must agree on bytes vs paths."""
    kinds: dict[str, list[tuple[str, pa.DataType]]] = {}
    for path, typ in per_file:
        if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            kinds.setdefault("bytes", []).append((path, typ))
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
            kinds.setdefault("paths", []).append((path, typ))
        elif not pa.types.is_null(typ):  # an all-null column: fits either
            raise InputError(f"--image-column {column!r} has type {typ} in {location.uri_of(path)}: expected binary "
                             "(image bytes) or string (paths/URIs)")
    if len(kinds) > 1:
        raise InputError(f"--image-column {column!r} holds image bytes in some files and paths in others: "
                         f"{kinds['bytes'][0][1]} in {location.uri_of(kinds['bytes'][0][0])}; "
                         f"{kinds['paths'][0][1]} in {location.uri_of(kinds['paths'][0][0])}")
    is_path = "paths" in kinds
    typed = kinds.get("paths") or kinds.get("bytes")
    if not typed:
        return pa.large_binary(), False
    return _column_type(location, column, "--image-column", typed), is_path


def _plan_parquet(config: Any, listing: InputListing) -> InputPlan:
    location, root, files = listing.root, listing.root.path, listing.paths
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        infos = list(pool.map(lambda p: _parquet_file_info(location, p, config), files))

    def per_file(column: str) -> list[tuple[str, pa.DataType]]:
        return [(path, schema.field(column).type) for path, (schema, _) in zip(files, infos)
                if column in schema.names]

    # ids: one type when the files agree, else strings - the same per-file cast as the plan's keys (id_to_key)
    id_types = {t for _, t in per_file(config.id_column)}
    id_type = id_types.pop() if len(id_types) == 1 else pa.string()
    image_type, image_is_path = _image_type(location, config.image_column, per_file(config.image_column))
    columns = {config.id_column: id_type, config.image_column: image_type}
    optional = [(c, "--question-column") for c in ([config.question_column] if config.question_column else [])]
    optional += [(c, "--keep-columns") for c in config.keep_columns]
    for column, flag in optional:
        have = per_file(column)
        if not have:
            raise InputError(f"{flag} {column!r} is in none of the {len(files)} input files (columns of "
                             f"{location.uri_of(files[0])}: {infos[0][0].names})")
        if column not in columns:
            columns[column] = _column_type(location, column, flag, have)
    keys = pa.concat_arrays([k for _, k in infos]) if len(infos) > 1 else infos[0][1]
    check_unique_keys(keys, f"--id-column {config.id_column!r}")
    keep = [pa.field(c, columns[c]) for c in config.keep_columns]
    read_schema = pa.schema(list(columns.items()))
    return InputPlan("parquet", Location(location.uri_of(root), root, location.fs), files, keys, keep, image_is_path,
                     read_schema)


def _plan_webdataset(config: Any, listing: InputListing) -> InputPlan:
    location, root, files = listing.root, listing.root.path, listing.paths
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        per_shard = list(pool.map(lambda p: tar_keys(location, p), files))
    keys = pa.array([k for shard in per_shard for k in shard], pa.string())
    check_unique_keys(keys, "WebDataset __key__")
    keep = [pa.field(c, pa.binary()) for c in config.keep_columns]
    return InputPlan("webdataset", Location(location.uri_of(root), root, location.fs), files, keys, keep)


def _plan_images(config: Any, listing: InputListing) -> InputPlan:
    location, root, files = listing.root, listing.root.path, listing.paths
    # a single file named by --input is listed whatever its extension
    bad = [f for f in files if not f.lower().endswith(tuple("." + e for e in IMAGE_EXTENSIONS))]
    if bad:
        raise not_a(location, bad[0], f"an image file ({', '.join(IMAGE_EXTENSIONS)})", "images", None)
    keys = pa.array([relative_key(root, f) for f in files], pa.string())
    check_unique_keys(keys, "relative paths")
    return InputPlan("images", Location(location.uri_of(root), root, location.fs), files, keys)


_PLANNERS = {  # format -> (planner, extensions read from a folder/prefix/glob, what they are in messages)
    "parquet": (_plan_parquet, PARQUET_EXTENSIONS, ".parquet files"),
    "webdataset": (_plan_webdataset, SHARD_EXTENSIONS, ".tar shards (or .tar.gz, .tgz)"),
    "images": (_plan_images, IMAGE_EXTENSIONS, f"image files ({', '.join(IMAGE_EXTENSIONS)})"),
}


def plan_input(config: Any, storage_options: Mapping[str, Any] | None = None) -> InputPlan:
    """List the input, check its columns and ids; raises InputError naming the problem before any work starts."""
    planner, extensions, what = _PLANNERS[config.input_format]
    listing = list_input(config.input, storage_options, extensions, what)
    plan = planner(config, listing)
    plan.skipped_files = listing.skipped_names
    logger.info("input %s: %d %s files, %d rows%s", config.input, len(plan.files), plan.input_format, len(plan.keys),
                f" ({len(plan.skipped_files)} skipped)" if plan.skipped_files else "")
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
        columns = [batch.column(c).to_pylist() for c in candidates if c in batch.column_names]
        members = batch.column(WDS_MEMBERS).to_pylist() if WDS_MEMBERS in batch.column_names else [None] * n
        values: list[bytes | None] = [None] * n
        for i in range(n):
            for col in columns:
                if col[i] is not None:
                    values[i] = col[i]
                    break
            else:
                has = f"; it has: {members[i] or 'no members'}" if members[i] is not None else ""
                errors[i] = f"normalize: sample has no image member (looked for {', '.join(candidates)}{has})"
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


# ---- Ray Data ------------------------------------------------------------------------------------------------------
def read_dataset(plan: InputPlan, config: Any) -> Any:
    """The Ray Dataset of the raw input (before normalising)."""
    import ray.data

    fs = plan.ray_filesystem()
    if plan.input_format == "parquet":
        columns = list(dict.fromkeys([config.id_column, config.image_column,
                                      *([config.question_column] if config.question_column else []),
                                      *config.keep_columns]))
        # select_columns is pushed down into the read: only these columns are fetched. The plan's schema makes every
        # file read alike: a column a file lacks comes back null, and types agree (else Ray merges the files'
        # schemas itself and fails on the first difference)
        return ray.data.read_parquet(plan.ray_paths(), filesystem=fs, schema=plan.read_schema).select_columns(columns)
    if plan.input_format == "webdataset":
        return ray.data.read_datasource(WebDatasetShards(plan.ray_paths(), webdataset_columns(config), filesystem=fs))
    return ray.data.read_binary_files(plan.ray_paths(), filesystem=fs, include_paths=True)


def normalize_stage(plan: InputPlan, config: Any) -> NormalizeStage:
    return NormalizeStage(plan.input_format, config.question, id_column=config.id_column,
                          image_column=config.image_column, image_is_path=plan.image_is_path,
                          image_key=config.image_key, question_column=config.question_column,
                          keep_columns=config.keep_columns, root_path=plan.root.path)

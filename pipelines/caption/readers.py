"""Inputs: plan (list files, check columns, collect and check every id - before any work), then read with Ray Data
and normalise every format to the same columns:

    key (string), question (string), status ('ok'), error_message (null unless the row is already known bad),
    __image (bytes or null), __image_path (string or null), <keep columns>

Formats:
* parquet - `--image-column` holds bytes (binary), paths/URIs (string), or HuggingFace `datasets` images
  (struct<bytes, path>: the bytes, else the path, resolved like a path column); `--id-column` the id. Without
  `--id-column` the `id` column is used when the files have one; when none has it, every row's id is derived from
  its file and position, `<file path relative to the input folder>#<row index from 0>` (`DERIVED_ID`): stable across
  reruns of the same input, which resume and --incremental need. Those rows are read by `ParquetRows`, which counts
  them per file.
* webdataset - `.tar` shards read by our own datasource (`WebDatasetShards`): every block has the same schema
  (`__key__`, `__url__`, `__members`, one binary column per wanted member, null where a sample lacks it), so shards
  and samples may differ in their members; bytes only, we decode ourselves with per-row errors. The id is
  `__key__`; the image is `--image-key` or the first of jpg/jpeg/png/webp present. Member suffixes are matched
  case-insensitively (the `webdataset` library lower-cases them).
* images - image files under a folder/prefix; the id is the path relative to it.

`--keep-columns source=name` copies input column `source` as output column `name`.

Parquet files, too, may differ in optional columns (`--question-column`, `--keep-columns`: null in the files that
lack them); the plan unifies the column types over all files and the read is given that schema, so Ray Data never
has to reconcile blocks of different schemas. The id and image columns are required in every file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray.data.datasource import FileBasedDatasource

from ..core.columns import keep_column_pairs
from ..core.inputs import InputError, check_unique_keys, id_to_key, list_input, not_a
from ..core.stage import SAMPLE, Column, Stage
from ..core.storage import IO_THREADS, InputListing, Location, relative_key
from . import schema as S
from .webdataset import (SHARD_EXTENSIONS, WDS_IMAGE_SUFFIXES, WDS_MEMBERS, WebDatasetShards, tar_keys,
                         webdataset_columns)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
PARQUET_EXTENSIONS = ("parquet",)
DEFAULT_ID_COLUMN = "id"  # used without --id-column when the files have it
DERIVED_ID = "__derived_id"  # `<file relative to the input folder>#<row index>`, added by ParquetRows
PARQUET_BLOCK_ROWS = 256  # rows per block that ParquetRows yields (image rows are big)
# the image column's kinds (`_image_type`): bytes, path strings, or the `datasets.Image` struct<bytes, path>
IMAGE_BYTES, IMAGE_PATHS, IMAGE_STRUCT = "bytes", "paths", "struct"


@dataclass
class InputPlan:
    input_format: str
    root: Location  # keys and relative image paths are relative to this folder
    files: list[str]  # fsspec paths
    keys: pa.Array  # every id, as strings, unique
    keep_fields: list[pa.Field] = field(default_factory=list)
    image_kind: str = IMAGE_BYTES  # parquet: IMAGE_BYTES, IMAGE_PATHS or IMAGE_STRUCT
    read_schema: pa.Schema | None = None  # parquet: the columns read, typed alike over all files (absent -> null)
    id_column: str | None = None  # parquet: the id column read; None: ids derived from file and row (DERIVED_ID)
    skipped_files: list[str] = field(default_factory=list)  # named by --input, not read (relative to `root`)

    @property
    def image_is_path(self) -> bool:
        return self.image_kind == IMAGE_PATHS

    def ray_paths(self) -> list[str]:
        return list(self.files)

    def ray_filesystem(self) -> Any:
        """None for local files (Ray's default), else the fsspec filesystem (Ray wraps it; it pickles its options)."""
        return None if self.root.is_local else self.root.fs


# ---- planning ----------------------------------------------------------------------------------------------------
def _parquet_file_info(location: Location, path: str, config: Any) -> tuple[pa.Schema, pa.Array | None, int]:
    """(schema, ids as keys - None when the file has no id column and --id-column was not given, rows)."""
    id_column = config.id_column or DEFAULT_ID_COLUMN
    try:
        with location.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            # only the id (when named) and the image are required in every file; optional columns are checked over
            # all files
            required = [c for c in (config.id_column, config.image_column) if c]
            missing = [c for c in required if c not in schema.names]
            if missing:
                raise InputError(f"{location.uri_of(path)}: missing column(s) {missing} (--id-column/--image-column: "
                                 f"required in every file). Available columns: {schema.names}")
            ids = pf.read(columns=[id_column]).column(0) if id_column in schema.names else None
            rows = pf.metadata.num_rows
    except pa.ArrowException as exc:
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowInvalid):
            raise InputError(f"{location.uri_of(path)}: cannot read: {type(exc).__name__}: {exc}") from None
        raise not_a(location, path, "a Parquet file", "parquet", exc) from None
    except OSError as exc:
        raise InputError(f"{location.uri_of(path)}: cannot read: {type(exc).__name__}: {exc}") from None
    return schema, None if ids is None else id_to_key(ids), rows


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


def _image_kind(typ: pa.DataType) -> str | None:
    """IMAGE_BYTES, IMAGE_PATHS, IMAGE_STRUCT (a `bytes` binary and/or `path` string field: HuggingFace `datasets`'
    Image feature) or None (another type)."""
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return IMAGE_BYTES
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return IMAGE_PATHS
    if pa.types.is_struct(typ):
        fields = {typ.field(i).name: _image_kind(typ.field(i).type) for i in range(typ.num_fields)}
        if (("bytes" in fields or "path" in fields) and fields.get("bytes", IMAGE_BYTES) == IMAGE_BYTES
                and fields.get("path", IMAGE_PATHS) == IMAGE_PATHS):
            return IMAGE_STRUCT
    return None


def _image_type(location: Location, column: str, per_file: list[tuple[str, pa.DataType]]) -> tuple[pa.DataType, str]:
    """(type to read the image column as, its kind); every file must agree on the kind (bytes, paths, struct)."""
    kinds: dict[str, list[tuple[str, pa.DataType]]] = {}
    for path, typ in per_file:
        kind = _image_kind(typ)
        if kind is not None:
            kinds.setdefault(kind, []).append((path, typ))
        elif not pa.types.is_null(typ):  # an all-null column: fits either
            raise InputError(f"--image-column {column!r} has type {typ} in {location.uri_of(path)}: expected binary "
                             "(image bytes), string (paths/URIs) or struct<bytes: binary, path: string> (a "
                             "HuggingFace `datasets` Image)")
    if len(kinds) > 1:
        names = {IMAGE_BYTES: "image bytes", IMAGE_PATHS: "paths", IMAGE_STRUCT: "struct<bytes, path>"}
        examples = "; ".join(f"{names[k]}: {v[0][1]} in {location.uri_of(v[0][0])}" for k, v in kinds.items())
        raise InputError(f"--image-column {column!r} holds different kinds of values across the input files "
                         f"({examples})")
    if not kinds:
        return pa.large_binary(), IMAGE_BYTES
    kind, typed = next(iter(kinds.items()))
    return _column_type(location, column, "--image-column", typed), kind


def _plan_ids(config: Any, location: Location, root: str, files: list[str],
              infos: list[tuple[pa.Schema, pa.Array | None, int]]) -> tuple[pa.Array, str | None]:
    """(every row's key, the id column read or None: derived ids `<relative file>#<row>`)."""
    with_ids = [path for path, (_, ids, _) in zip(files, infos) if ids is not None]
    if len(with_ids) == len(files):
        keys = pa.concat_arrays([ids for _, ids, _ in infos]) if len(infos) > 1 else infos[0][1]
        return keys, config.id_column or DEFAULT_ID_COLUMN
    if with_ids:  # only without --id-column (a named column is required in every file)
        without = next(p for p in files if p not in with_ids)
        raise InputError(f"some input files have an {DEFAULT_ID_COLUMN!r} column and others do not "
                         f"({location.uri_of(with_ids[0])} has it, {location.uri_of(without)} does not): ids are "
                         f"read from that column or derived from file and row for the whole input, not both; give "
                         f"every file the column (or none)")
    keys = pa.array([f"{relative_key(root, path)}#{i}" for path, (_, _, rows) in zip(files, infos)
                     for i in range(rows)], pa.string())
    logger.info("input %s has no %r column and --id-column was not given: ids are derived from the input file and "
                "row, `<file path relative to %s>#<row index from 0>` (stable across reruns of the same files)",
                location.uri, DEFAULT_ID_COLUMN, location.uri_of(root))
    return keys, None


def _plan_parquet(config: Any, listing: InputListing) -> InputPlan:
    location, root, files = listing.root, listing.root.path, listing.paths
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        infos = list(pool.map(lambda p: _parquet_file_info(location, p, config), files))

    def per_file(column: str) -> list[tuple[str, pa.DataType]]:
        return [(path, schema.field(column).type) for path, (schema, _, _) in zip(files, infos)
                if column in schema.names]

    keys, id_column = _plan_ids(config, location, root, files, infos)
    image_type, image_kind = _image_type(location, config.image_column, per_file(config.image_column))
    columns = {config.image_column: image_type}
    if id_column is not None:
        # ids: one type when the files agree, else strings - the same per-file cast as the plan's keys (id_to_key)
        id_types = {t for _, t in per_file(id_column)}
        columns = {id_column: id_types.pop() if len(id_types) == 1 else pa.string(), **columns}
    keep_pairs = keep_column_pairs(config.keep_columns)
    optional = [(c, "--question-column") for c in ([config.question_column] if config.question_column else [])]
    optional += [(source, "--keep-columns") for source, _ in keep_pairs]
    for column, flag in optional:
        have = per_file(column)
        if not have:
            raise InputError(f"{flag} {column!r} is in none of the {len(files)} input files (columns of "
                             f"{location.uri_of(files[0])}: {infos[0][0].names})")
        if column not in columns:
            columns[column] = _column_type(location, column, flag, have)
    check_unique_keys(keys, f"--id-column {id_column!r}" if id_column else "ids derived from file and row")
    keep = [pa.field(target, columns[source]) for source, target in keep_pairs]
    read_schema = pa.schema(list(columns.items()))
    return InputPlan("parquet", Location(location.uri_of(root), root, location.fs), files, keys, keep, image_kind,
                     read_schema, id_column=id_column)


def _plan_webdataset(config: Any, listing: InputListing) -> InputPlan:
    location, root, files = listing.root, listing.root.path, listing.paths
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        per_shard = list(pool.map(lambda p: tar_keys(location, p), files))
    keys = pa.array([k for shard in per_shard for k in shard], pa.string())
    check_unique_keys(keys, "WebDataset __key__")
    keep = [pa.field(target, pa.binary()) for _, target in keep_column_pairs(config.keep_columns)]
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


def _struct_image(col: pa.Array) -> tuple[pa.Array, pa.Array, list[str | None]]:
    """A `datasets.Image` column (struct<bytes, path>): the bytes; the path only where the bytes are null."""
    n = len(col)
    names = [col.type.field(i).name for i in range(col.type.num_fields)]
    # a null struct is a null image; its fields may hold anything
    valid = pc.is_valid(col)
    data = (pc.if_else(valid, pc.cast(col.field("bytes"), pa.large_binary()), pa.scalar(None, pa.large_binary()))
            if "bytes" in names else pa.nulls(n, pa.large_binary()))
    paths = (pc.if_else(pc.and_(valid, pc.is_null(data)), pc.cast(col.field("path"), pa.string()),
                        pa.scalar(None, pa.string()))
             if "path" in names else pa.nulls(n, pa.string()))
    return data, paths, [None] * n


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

    def __init__(self, input_format: str, question: str, id_column: str | None = "id", image_column: str = "image",
                 image_is_path: bool = False, image_key: str | None = None, question_column: str | None = None,
                 keep_columns: Sequence[str] = (), root_path: str = "", image_kind: str | None = None) -> None:
        """`id_column` None: the rows carry derived ids (DERIVED_ID, see `ParquetRows`). `keep_columns`: names or
        `source=name` entries. `image_kind` (parquet): IMAGE_BYTES/IMAGE_PATHS/IMAGE_STRUCT (default: from
        `image_is_path`)."""
        self.input_format = input_format
        self.question = question
        self.id_column, self.image_column = id_column, image_column
        self.image_kind = image_kind or (IMAGE_PATHS if image_is_path else IMAGE_BYTES)
        self.image_key, self.question_column = image_key, question_column
        self.keep_pairs = keep_column_pairs(keep_columns)
        self.root_path = root_path
        self.requires = {
            "parquet": (Column(id_column or DERIVED_ID, "--id-column" if id_column else "id derived from file and row"),
                        Column(image_column, "--image-column")),
            "webdataset": (Column("__key__", "WebDataset sample key"),),
            "images": (Column("path", "file path (read_binary_files include_paths)"),
                       Column("bytes", "file content")),
        }[input_format]

    def _images(self, batch: pa.Table) -> tuple[pa.Array, pa.Array, list[str | None]]:
        n = batch.num_rows
        errors: list[str | None] = [None] * n
        if self.input_format == "parquet":
            col = batch.column(self.image_column).combine_chunks()
            if self.image_kind == IMAGE_PATHS:
                return pa.nulls(n, pa.large_binary()), pc.cast(col, pa.string()), errors
            if self.image_kind == IMAGE_STRUCT:
                return _struct_image(col)
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
            return id_to_key(batch.column(self.id_column or DERIVED_ID))
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
        for source, target in self.keep_pairs:
            columns[target] = _column_or_nulls(batch, source, batch.schema.field(source).type
                                               if source in batch.column_names else pa.binary())
        return pa.table(columns)


# ---- Ray Data ------------------------------------------------------------------------------------------------------
class ParquetRows(FileBasedDatasource):
    """Parquet files read with each row's derived id (`DERIVED_ID`: `<file relative to the input folder>#<row index>`)
    for inputs without an id column. One file is read by one task, row groups in order, so the row index is the
    row's position in its file whatever the block boundaries. Blocks have `schema` (the plan's read schema: types
    agree across files, a column a file lacks is null) plus DERIVED_ID."""

    _FILE_EXTENSIONS = None  # the plan already chose the files

    def __init__(self, paths: Sequence[str], relative: Mapping[str, str], schema: pa.Schema,
                 **file_based_kwargs: Any) -> None:
        self.read_schema = schema.append(pa.field(DERIVED_ID, pa.string()))
        super().__init__(list(paths), schema=self.read_schema, **file_based_kwargs)
        self.relative = dict(relative)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access (the footer first)

    def _relative(self, path: str) -> str:
        if path in self.relative:
            return self.relative[path]
        # Ray may hand the path back in another spelling (a scheme or a leading slash added or removed)
        bare = path.split("://", 1)[-1].strip("/")
        for planned, rel in self.relative.items():
            if planned.split("://", 1)[-1].strip("/") == bare:
                return rel
        raise ValueError(f"ParquetRows: {path} is not one of the planned input files")

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rel = self._relative(path)
        pf = pq.ParquetFile(f)
        present = [c for c in self.read_schema.names if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BLOCK_ROWS, columns=present):
            n = batch.num_rows
            columns = []
            for field_ in self.read_schema:
                if field_.name == DERIVED_ID:
                    columns.append(pa.array([f"{rel}#{i}" for i in range(row, row + n)], pa.string()))
                elif field_.name in present:
                    col = batch.column(field_.name)
                    columns.append(col if col.type == field_.type else pc.cast(col, field_.type))
                else:
                    columns.append(pa.nulls(n, field_.type))
            row += n
            yield pa.Table.from_arrays(columns, schema=self.read_schema)


def read_dataset(plan: InputPlan, config: Any) -> Any:
    """The Ray Dataset of the raw input (before normalising)."""
    import ray.data

    fs = plan.ray_filesystem()
    if plan.input_format == "parquet":
        if plan.id_column is None:
            relative = {path: relative_key(plan.root.path, path) for path in plan.files}
            return ray.data.read_datasource(ParquetRows(plan.ray_paths(), relative, plan.read_schema, filesystem=fs))
        # select_columns is pushed down into the read: only these columns are fetched. The plan's schema makes every
        # file read alike: a column a file lacks comes back null, and types agree (else Ray merges the files'
        # schemas itself and fails on the first difference)
        return ray.data.read_parquet(plan.ray_paths(), filesystem=fs, schema=plan.read_schema).select_columns(
            plan.read_schema.names)
    if plan.input_format == "webdataset":
        return ray.data.read_datasource(WebDatasetShards(plan.ray_paths(), webdataset_columns(config), filesystem=fs))
    return ray.data.read_binary_files(plan.ray_paths(), filesystem=fs, include_paths=True)


def normalize_stage(plan: InputPlan, config: Any) -> NormalizeStage:
    return NormalizeStage(plan.input_format, config.question, id_column=plan.id_column or None,
                          image_column=config.image_column, image_kind=plan.image_kind,
                          image_key=config.image_key, question_column=config.question_column,
                          keep_columns=config.keep_columns, root_path=plan.root.path)

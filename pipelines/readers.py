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
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
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
WDS_MEMBERS = "__members"  # the suffixes a WebDataset sample has, comma-separated (for error messages)
WDS_BLOCK_ROWS = 512  # Ray's own read_webdataset chunk
WDS_BLOCK_BYTES = 64 << 20  # ... but never hold more member bytes than this in one block
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
    read_schema: pa.Schema | None = None  # parquet: the columns read, typed alike over all files (absent -> null)

    def ray_paths(self) -> list[str]:
        return list(self.files)

    def ray_filesystem(self) -> Any:
        """None for local files (Ray's default), else the fsspec filesystem (Ray wraps it; it pickles its options)."""
        return None if self.root.is_local else self.root.fs


# ---- what is at the input path ------------------------------------------------------------------------------------
_LISTING_MODULES = ("botocore", "aiobotocore", "s3fs")  # their errors (network, auth) are not always OSErrors


def list_input(location: Location, extensions: Sequence[str], what: str) -> tuple[str, list[str]]:
    """`expand_input`, with every way it can come up empty turned into an InputError that says which: the path does
    not exist (a missing bucket included), cannot be listed, or holds no `what` (then the message shows what it does
    hold, since a wrong --input-format is the usual cause)."""
    try:
        root, files = expand_input(location, extensions)
        others = [] if files else expand_input(location, None)[1]
    except FileNotFoundError as exc:
        detail = str(exc)
        raise InputError(detail if detail.startswith(location.uri) else f"{location.uri} does not exist ({detail})"
                         ) from None
    except Exception as exc:  # noqa: BLE001 - a listing failure of any kind is the input's problem, said plainly
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith(_LISTING_MODULES):
            raise
        raise InputError(f"cannot list {location.uri}: {type(exc).__name__}: {exc}") from None
    if not files:
        names = [relative_key(root, p) if p.startswith(root.rstrip("/") + "/") else p for p in others]
        found = (f" (found: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; is --input-format right?)"
                 if names else " (it holds no files)")
        raise InputError(f"no {what} found at {location.uri}{found}")
    return root, files


def _sniff(head: bytes) -> str | None:
    """What a file looks like from its first bytes, for "wrong --input-format?" hints."""
    if head[:4] == b"PAR1":
        return "a Parquet file (--input-format parquet)"
    if head[257:262] == b"ustar":
        return "a tar archive (--input-format webdataset)"
    if (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:6] in (b"GIF87a", b"GIF89a")
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return "an image (--input-format images)"
    return None


def not_a(location: Location, path: str, expected: str, input_format: str, exc: BaseException | None) -> InputError:
    """The InputError for a file that is not what --input-format says: names the file, what was expected, why,
    and what it looks like instead."""
    try:
        with location.fs.open(path, "rb") as fh:
            looks = _sniff(fh.read(512))
    except OSError:
        looks = None
    # the last line is the telling one (tarfile lists each compression it tried, the plain tar attempt last)
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")] if exc is not None else []
    why = f" ({type(exc).__name__}: {lines[-1] if lines else ''})" if exc is not None else ""
    hint = f"; it looks like {looks}" if looks else ""
    return InputError(f"{location.uri_of(path)}: not {expected}, which --input-format {input_format} expects"
                      f"{why}{hint}")


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


def _plan_parquet(config: Any, location: Location) -> InputPlan:
    root, files = list_input(location, ["parquet"], ".parquet files")
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
    _check_unique(keys, f"--id-column {config.id_column!r}")
    keep = [pa.field(c, columns[c]) for c in config.keep_columns]
    read_schema = pa.schema(list(columns.items()))
    return InputPlan("parquet", Location(location.uri_of(root), root, location.fs), files, keys, keep, image_is_path,
                     read_schema)


def iter_tar_samples(tar: tarfile.TarFile, wanted: AbstractSet[str] = frozenset()
                     ) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """WebDataset's grouping of a tar's members into samples, in tar order: (key, {suffix: bytes} for the wanted
    lower-cased suffixes, every suffix the sample has). Members that are no regular files or have no '.' in their
    base name are skipped; a sample's first member of a suffix wins. The plan (keys) and the read (rows) both use
    it, so they agree on what a sample is."""
    key: str | None = None
    members: dict[str, bytes] = {}
    suffixes: list[str] = []
    for info in tar:
        if not info.isreg():
            continue
        m = _WDS_KEY.match(info.name)
        if not m:
            continue
        name, suffix = m.group(1), m.group(2).lower()
        if name != key:
            if key is not None:
                yield key, members, suffixes
            key, members, suffixes = name, {}, []
        suffixes.append(suffix)
        if suffix in wanted and suffix not in members:
            extracted = tar.extractfile(info)
            members[suffix] = extracted.read() if extracted is not None else b""
    if key is not None:
        yield key, members, suffixes


def webdataset_columns(config: Any) -> list[str]:
    """The member columns a caption job reads from WebDataset samples: image candidates, question, keep columns."""
    wanted = [config.image_key] if config.image_key else list(WDS_IMAGE_SUFFIXES)
    wanted += [config.question_column] if config.question_column else []
    return list(dict.fromkeys([*wanted, *config.keep_columns]))


def webdataset_schema(columns: Sequence[str]) -> pa.Schema:
    """The schema of every block read from shards: fixed, so that blocks of shards/samples with different members
    concatenate (Ray's read_webdataset infers each block's columns and types from its samples: a member absent from
    a block, or absent on some of its rows, breaks the concatenation or the pandas-to-Arrow conversion)."""
    return pa.schema([pa.field("__key__", pa.string()), pa.field("__url__", pa.string()),
                      pa.field(WDS_MEMBERS, pa.string()), *(pa.field(c, pa.binary()) for c in columns)])


def webdataset_blocks(fileobj: Any, url: str, columns: Sequence[str]) -> Iterator[pa.Table]:
    """One shard (a readable stream; read sequentially, never seeked) -> blocks of `webdataset_schema(columns)`,
    one row per sample, every member as bytes (null when the sample lacks it). Members are matched to columns by
    lower-cased suffix. Deterministic, so that Ray can retry a read and skip the blocks it already has."""
    schema = webdataset_schema(columns)
    wanted = {c.lower() for c in columns}
    rows: list[tuple[str, dict[str, bytes], list[str]]] = []
    size = 0

    def block() -> pa.Table:
        data: dict[str, list[Any]] = {"__key__": [r[0] for r in rows], "__url__": [url] * len(rows),
                                      WDS_MEMBERS: [",".join(r[2]) for r in rows]}
        for c in columns:
            data[c] = [r[1].get(c.lower()) for r in rows]
        return pa.table(data, schema=schema)

    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for sample in iter_tar_samples(tar, wanted):
            rows.append(sample)
            size += sum(len(v) for v in sample[1].values())
            if len(rows) >= WDS_BLOCK_ROWS or size >= WDS_BLOCK_BYTES:
                yield block()
                rows, size = [], 0
    if rows:
        yield block()


def tar_keys(location: Location, path: str) -> list[str]:
    """The sample keys of one shard, from the tar headers (seeking past the member data)."""
    keys: list[str] = []
    seen: set[str] = set()
    try:
        with location.fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
            for key, _, _ in iter_tar_samples(tar):
                if key in seen:
                    raise InputError(f"{location.uri_of(path)}: members of sample {key!r} are not contiguous (or the "
                                     "key occurs twice in the shard); WebDataset needs each sample's files next to "
                                     "each other")
                seen.add(key)
                keys.append(key)
    except (tarfile.TarError, EOFError) as exc:
        raise not_a(location, path, "a tar archive", "webdataset", exc) from None
    except OSError as exc:
        raise InputError(f"{location.uri_of(path)}: cannot read: {type(exc).__name__}: {exc}") from None
    return keys


def _plan_webdataset(config: Any, location: Location) -> InputPlan:
    root, files = list_input(location, ["tar"], ".tar shards")
    with ThreadPoolExecutor(min(IO_THREADS, len(files))) as pool:
        per_shard = list(pool.map(lambda p: tar_keys(location, p), files))
    keys = pa.array([k for shard in per_shard for k in shard], pa.string())
    _check_unique(keys, "WebDataset __key__")
    keep = [pa.field(c, pa.binary()) for c in config.keep_columns]
    return InputPlan("webdataset", Location(location.uri_of(root), root, location.fs), files, keys, keep)


def _plan_images(config: Any, location: Location) -> InputPlan:
    root, files = list_input(location, IMAGE_EXTENSIONS, f"image files ({', '.join(IMAGE_EXTENSIONS)})")
    # a single file named by --input is listed whatever its extension
    bad = [f for f in files if not f.lower().endswith(tuple("." + e for e in IMAGE_EXTENSIONS))]
    if bad:
        raise not_a(location, bad[0], f"an image file ({', '.join(IMAGE_EXTENSIONS)})", "images", None)
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
        # select_columns is pushed down into the read: only these columns are fetched. The plan's schema makes every
        # file read alike: a column a file lacks comes back null, and types agree (else Ray merges the files'
        # schemas itself and fails on the first difference)
        return ray.data.read_parquet(plan.ray_paths(), filesystem=fs, schema=plan.read_schema).select_columns(columns)
    if plan.input_format == "webdataset":
        from .webdataset_source import WebDatasetShards

        return ray.data.read_datasource(WebDatasetShards(plan.ray_paths(), webdataset_columns(config), filesystem=fs))
    return ray.data.read_binary_files(plan.ray_paths(), filesystem=fs, include_paths=True)


def normalize_stage(plan: InputPlan, config: Any) -> NormalizeStage:
    return NormalizeStage(plan.input_format, config.question, id_column=config.id_column,
                          image_column=config.image_column, image_is_path=plan.image_is_path,
                          image_key=config.image_key, question_column=config.question_column,
                          keep_columns=config.keep_columns, root_path=plan.root.path)

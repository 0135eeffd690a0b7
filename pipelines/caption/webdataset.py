"""WebDataset shards: how tar members group into samples (one rule for the plan's keys and the read's rows), and the
Ray Data datasource that reads shards into blocks of one fixed schema - so shards and samples may differ in their
members (a member absent from a sample is null) without breaking the blocks Ray Data concatenates."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from ..core.columns import keep_column_pairs
from ..core.inputs import InputError, not_a
from ..core.storage import Location

WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# shards read from a folder, prefix or glob; gzip-compressed ones too (tarfile tells the compression from the bytes)
SHARD_EXTENSIONS = ("tar", "tar.gz", "tgz")
WDS_MEMBERS = "__members"  # the suffixes a WebDataset sample has, comma-separated (for error messages)
WDS_BLOCK_ROWS = 512  # Ray's own read_webdataset chunk
WDS_BLOCK_BYTES = 64 << 20  # ... but never hold more member bytes than this in one block
# WebDataset's own rule (and Ray's `read_webdataset`): the key is the member name up to the first '.' of its base
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


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
    return list(dict.fromkeys([*wanted, *(source for source, _ in keep_column_pairs(config.keep_columns))]))


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


class WebDatasetShards(FileBasedDatasource):
    """Reads `.tar` (and `.tar.gz`/`.tgz`) shards into blocks of `webdataset_schema(columns)` (see
    `webdataset_blocks`)."""

    _FILE_EXTENSIONS = None  # the plan already chose the files; a shard named by --input may have any extension

    def __init__(self, paths: Sequence[str], columns: Sequence[str], **file_based_kwargs: Any) -> None:
        super().__init__(list(paths), schema=webdataset_schema(columns), **file_based_kwargs)
        self.columns = list(columns)

    def resolve_compression(self, path: str, open_args: dict[str, Any]) -> str | None:
        # Ray would gunzip `.gz` by the name but not `.tgz`; tarfile's "r|*" tells gzip from the bytes, the same way
        # the plan's `tar_keys` does, so every shard is opened raw and both agree on what a shard holds
        return None

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from webdataset_blocks(f, path, self.columns)

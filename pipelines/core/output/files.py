"""Output data files: names, formats (Parquet, WebDataset tar), and reading back their (key, status) index.

A data file is named `part-r<run>-<hash of its sorted keys>.<parquet|tar>`, its rows sorted by key, so a retried
write task (same rows) rewrites the same file with the same bytes instead of adding a second copy. Each data file
is written whole (atomically, see `storage.Location.write_bytes_atomic`), and only THEN its checkpoint
`_checkpoint/<same stem>.parquet` (key, status): a data file without a checkpoint is a write that a kill
interrupted, and resume deletes it (see `store.py`).

WebDataset output: per row a `<k>.txt` member (the caption; empty on error) and `<k>.json` (the full row). `k` is
the key with `%`, `.`, control characters (NUL included) and a leading `/` percent-encoded, because WebDataset
splits a sample's key from the member suffix at the first `.` of the file name (`a.jpg.txt` would read back as key
`a`) and a NUL ends a tar member name; `urllib.parse.unquote(k)` gives the key back, and the json member holds it
verbatim.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import columns as S
from ..storage import Location

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "_checkpoint"
DATA_FILE_RE = re.compile(r"^part-r(?P<run>\d{4,})-(?P<digest>[0-9a-f]{16})\.(?P<ext>parquet|tar)$")
EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}
INDEX_SCHEMA = pa.schema([pa.field(S.KEY, pa.string()), pa.field(S.STATUS, pa.string())])


def data_file_name(run: int, keys: Iterable[str], output_format: str) -> str:
    digest = hashlib.sha256("\0".join(sorted(keys)).encode("utf-8")).hexdigest()[:16]
    return f"part-r{run:04d}-{digest}.{EXTENSIONS[output_format]}"


def parse_data_file_name(name: str) -> tuple[int, str] | None:
    """(run, extension) of one of our data file names, else None."""
    m = DATA_FILE_RE.match(name)
    return (int(m.group("run")), m.group("ext")) if m else None


def checkpoint_name(data_name: str) -> str:
    return data_name.rsplit(".", 1)[0] + ".parquet"


# ---- formats -------------------------------------------------------------------------------------------------
# control characters in a tar member name: NUL ends the name (`x\0y` would be written as `x`), the others break
# the tools that list members line by line
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def wds_key(key: str) -> str:
    """A row key as a tar member stem that reads back as itself (`urllib.parse.unquote`)."""
    encoded = _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", key.replace("%", "%25").replace(".", "%2E"))
    return "%2F" + encoded[1:] if encoded.startswith("/") else encoded


def _json_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode("ascii")
    return value


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def json_member(row: dict[str, Any]) -> bytes:
    """A row as the `json` member; it must hold `key` and `status` (what `read_index` reads back). Kept input
    columns of types JSON lacks (timestamps, decimals) are written as their ISO / decimal text."""
    return json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False, default=_json_text
                      ).encode("utf-8")


def _json_text(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


# (row dict) -> [(member suffix, bytes), ...]; a module-level function, so write stages pickle it by reference
TarMembers = Callable[[dict[str, Any]], list[tuple[str, bytes]]]


def _tar_bytes(table: pa.Table, members_of: TarMembers) -> bytes:
    sink = io.BytesIO()
    mtime = int(time.time())
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in table.to_pylist():
            stem = wds_key(row[S.KEY])
            for suffix, data in members_of(row):
                info = tarfile.TarInfo(f"{stem}.{suffix}")
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def encode_table(table: pa.Table, output_format: str, tar_members: TarMembers) -> bytes:
    if output_format == "parquet":
        return _parquet_bytes(table)
    return _tar_bytes(table, tar_members)


def _tar_rows(data: bytes) -> list[tuple[str, list[tarfile.TarInfo], dict[str, Any]]]:
    """(key, members, json row) per sample of one of our tars."""
    samples: dict[str, tuple[list[tarfile.TarInfo], dict[str, Any]]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            stem, _, suffix = info.name.rpartition(".")
            if stem not in samples:
                samples[stem] = ([], {})
                order.append(stem)
            samples[stem][0].append(info)
            if suffix == "json":
                samples[stem][1].update(json.loads(tar.extractfile(info).read().decode("utf-8")))
    return [(samples[s][1].get(S.KEY, unquote(s)), *samples[s]) for s in order]


def read_index(data: bytes, output_format: str) -> pa.Table:
    """(key, status) of every row of a data file."""
    if output_format == "parquet":
        return pq.read_table(io.BytesIO(data), columns=[S.KEY, S.STATUS]).cast(INDEX_SCHEMA)
    rows = _tar_rows(data)
    return pa.table({S.KEY: [r[0] for r in rows], S.STATUS: [r[2].get(S.STATUS) for r in rows]}, schema=INDEX_SCHEMA)


def drop_keys(data: bytes, output_format: str, keys: set[str]) -> tuple[bytes, pa.Table]:
    """A data file's bytes without the rows whose key is in `keys`, and the (key, status) index of what is left."""
    if output_format == "parquet":
        table = pq.read_table(io.BytesIO(data))
        table = table.filter(pc.invert(pc.is_in(table[S.KEY], value_set=pa.array(sorted(keys), pa.string()))))
        return _parquet_bytes(table), table.select([S.KEY, S.STATUS]).cast(INDEX_SCHEMA)
    sink = io.BytesIO()
    kept_keys, kept_status = [], []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src, \
            tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as dst:
        by_name = {m.name: m for m in src.getmembers()}
        for key, members, row in _tar_rows(data):
            if key in keys:
                continue
            kept_keys.append(key)
            kept_status.append(row.get(S.STATUS))
            for info in members:
                dst.addfile(by_name[info.name], src.extractfile(by_name[info.name]))
    return sink.getvalue(), pa.table({S.KEY: kept_keys, S.STATUS: kept_status}, schema=INDEX_SCHEMA)


# ---- writing ---------------------------------------------------------------------------------------------------
@dataclass
class WrittenFile:
    name: str
    index: pa.Table  # key, status


def write_encoded(output: Location, run: int, data: bytes, index: pa.Table, output_format: str) -> WrittenFile:
    """Write an encoded data file, then its checkpoint (in that order: see the module docstring)."""
    name = data_file_name(run, index[S.KEY].to_pylist(), output_format)
    output.child(name).write_bytes_atomic(data)
    output.child(CHECKPOINT_DIR, checkpoint_name(name)).write_bytes_atomic(_parquet_bytes(index))
    return WrittenFile(name, index)


def write_data_file(output: Location, run: int, table: pa.Table, output_format: str,
                    tar_members: TarMembers) -> WrittenFile:
    table = table.sort_by(S.KEY)
    index = table.select([S.KEY, S.STATUS]).cast(INDEX_SCHEMA)
    return write_encoded(output, run, encode_table(table, output_format, tar_members), index, output_format)


def status_counts(index: pa.Table) -> dict[str, int]:
    """{status: rows} of a (key, status) index."""
    if not index.num_rows:
        return {}
    return {v["values"]: v["counts"] for v in pc.value_counts(index[S.STATUS]).to_pylist()}


# ---- merging (incremental outputs) -----------------------------------------------------------------------------
def _tar_samples(data: bytes) -> list[tuple[str, str | None, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, status, [(member info, bytes)]) per sample of one of our tars."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        by_name = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    return [(key, row.get(S.STATUS), [(info, by_name[info.name]) for info in members])
            for key, members, row in _tar_rows(data)]


def merge_data_files(datas: list[bytes], output_format: str, rows_per_file: int) -> list[tuple[bytes, pa.Table]]:
    """The rows of several data files as new data files of at most `rows_per_file` rows, sorted by key across all:
    [(encoded bytes, (key, status) index)]. No rows: no files."""
    if output_format == "parquet":
        tables = [pq.read_table(io.BytesIO(d)) for d in datas]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="permissive").sort_by(S.KEY)
        parts = [table.slice(i, rows_per_file) for i in range(0, table.num_rows, rows_per_file)]
        return [(_parquet_bytes(p), p.select([S.KEY, S.STATUS]).cast(INDEX_SCHEMA)) for p in parts]
    samples = sorted((s for d in datas for s in _tar_samples(d)), key=lambda s: s[0])
    out = []
    for i in range(0, len(samples), rows_per_file):
        chunk = samples[i:i + rows_per_file]
        sink = io.BytesIO()
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for _, _, members in chunk:
                for info, data in members:
                    tar.addfile(info, io.BytesIO(data))
        index = pa.table({S.KEY: [s[0] for s in chunk], S.STATUS: [s[1] for s in chunk]}, schema=INDEX_SCHEMA)
        out.append((sink.getvalue(), index))
    return out

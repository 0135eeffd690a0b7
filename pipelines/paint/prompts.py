"""Prompt lists for the paint job: plan (list files, parse, check columns and keys - before any work), derive the
per-image seeds, expand prompts into image rows.

Formats (by file extension; a folder/prefix may mix them): `.txt` (one prompt per line), `.jsonl` (one JSON object
per line), `.csv` (header row), `.parquet`. Columns: `--prompt-column` (default `prompt`), and optionally `key`,
`negative_prompt`, `seed`.

* Prompt keys: the `key` column (any type, as a string; every row needs one, unique across all files), else the
  1-based row number (txt/jsonl: the line number; csv: the record number after the header; parquet: the row
  number). With several input files and no `key` column the key is `<file path relative to --input>:<number>`.
* A missing prompt column, a `key` column missing on some rows, duplicate or empty keys, undecodable UTF-8 or a
  malformed JSON line: `InputError` before any work. A null prompt, a non-text prompt or a bad seed value: an
  error ROW (status "error") - the rest of the job runs.
* Prompt text is kept verbatim (empty, whitespace-only, control characters, `<ans>`, `</s>`, ...): the model
  escapes it. txt lines are split on "\\n" only (a trailing "\\r" is dropped), never on other line separators,
  which are prompt text.
* Seeds (per image, see `image_seed`): the row's `seed` + image index (mod 2**63) when the row has a seed - the
  same rule as `PaintModel.generate(seeds=<one per prompt>)`; else derived from (`--seed`, prompt key, image index)
  by SHA-256, so it depends on nothing else (not the file order, batch, worker or run).
* Image keys: `<prompt key>-<image index>` (injective: the index is digits after the last `-`).

This module imports neither Ray nor torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import columns as C
from ..core.inputs import InputError, check_unique_keys, id_to_key, list_input
from ..core.stage import Column, Stage, error_text
from ..core.storage import Location, relative_key
from .schema import (IMAGE_INDEX, IMAGE_ROW_SCHEMA, KEY_COLUMN, NEGATIVE_COLUMN, PROMPT, PROMPT_KEY,
                     PROMPT_TABLE_SCHEMA, SEED_COLUMN)

logger = logging.getLogger(__name__)

FORMAT_OF_EXTENSION = {"txt": "txt", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}
MAX_SEED = 2 ** 63  # seeds are ints in [0, 2**63) (PaintModel's rule)
SEED_DOMAIN = b"viscpm-batch/paint-seed/v1"  # changing it changes every derived seed: keep it


# ---- seeds and keys ------------------------------------------------------------------------------------------------
def derive_seed(base_seed: int, prompt_key: str, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_key` when the row has no seed: the first 8 bytes of
    SHA-256(domain, --seed, key, index) as an int, shifted into [0, 2**63). Stable across Python versions and
    machines (no `hash()`)."""
    h = hashlib.sha256()
    for part in (SEED_DOMAIN, str(int(base_seed)).encode(), prompt_key.encode("utf-8"), str(int(image_index)).encode()):
        h.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two (key, index) pairs share a byte string
        h.update(part)
    return int.from_bytes(h.digest()[:8], "big") >> 1


def image_seed(row_seed: int | None, base_seed: int, prompt_key: str, image_index: int) -> int:
    if row_seed is not None:
        return (int(row_seed) + int(image_index)) % MAX_SEED
    return derive_seed(base_seed, prompt_key, image_index)


def image_key(prompt_key: str, image_index: int) -> str:
    return f"{prompt_key}-{int(image_index)}"


# ---- parsing one file ------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """Parsed rows of one file, as Python lists (None: absent/null)."""

    keys: list[Any] | None  # None: the file has no key column
    prompts: list[Any]
    negatives: list[Any]
    seeds: list[Any]


def _text(data: bytes, uri: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not UTF-8 text ({exc})") from exc
    return text.removeprefix("\ufeff")


def _parse_txt(data: bytes, uri: str, config: Any) -> _Rows:
    text = _text(data, uri)
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the file's final newline ends the last line; it starts no new prompt
        lines.pop()
    prompts = [line.removesuffix("\r") for line in lines]
    n = len(prompts)
    return _Rows(None, prompts, [None] * n, [None] * n)


def _parse_jsonl(data: bytes, uri: str, config: Any) -> _Rows:
    records: list[dict[str, Any]] = []
    for number, line in enumerate(_text(data, uri).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{uri} line {number}: not valid JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise InputError(f"{uri} line {number}: expected a JSON object, got {type(value).__name__}")
        records.append(value)
    col = config.prompt_column
    if records and not any(col in r for r in records):
        seen = sorted({k for r in records[:100] for k in r})
        raise InputError(f"{uri}: no record has the prompt column {col!r} (--prompt-column). Fields seen: {seen}")
    has_key = any(KEY_COLUMN in r for r in records)
    if has_key and not all(KEY_COLUMN in r for r in records):
        missing = sum(KEY_COLUMN not in r for r in records)
        raise InputError(f"{uri}: {missing} records have no {KEY_COLUMN!r} while others do: every row needs one")
    keys = [None if r.get(KEY_COLUMN) is None else str(r[KEY_COLUMN]) for r in records] if has_key else None
    return _Rows(keys, [r.get(col) for r in records], [r.get(NEGATIVE_COLUMN) for r in records],
                 [r.get(SEED_COLUMN) for r in records])


def _parse_csv(data: bytes, uri: str, config: Any) -> _Rows:
    reader = csv.DictReader(io.StringIO(_text(data, uri), newline=""))
    header = reader.fieldnames or []
    if config.prompt_column not in header:
        raise InputError(f"{uri}: missing prompt column {config.prompt_column!r} (--prompt-column). "
                         f"Header: {header}")
    rows = list(reader)

    def col(name: str) -> list[Any]:
        # a short record lacks trailing cells (None); an empty negative/seed cell means "not given"
        return [(r.get(name) or None) for r in rows] if name in header else [None] * len(rows)

    keys = [r.get(KEY_COLUMN) for r in rows] if KEY_COLUMN in header else None
    return _Rows(keys, [r.get(config.prompt_column) for r in rows], col(NEGATIVE_COLUMN), col(SEED_COLUMN))


def _parse_parquet(data: bytes, uri: str, config: Any) -> _Rows:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{uri}: not a Parquet file, which its .parquet name says ({exc})") from None
    names = pf.schema_arrow.names
    if config.prompt_column not in names:
        raise InputError(f"{uri}: missing prompt column {config.prompt_column!r} (--prompt-column). "
                         f"Available columns: {names}")
    wanted = [c for c in dict.fromkeys([config.prompt_column, KEY_COLUMN, NEGATIVE_COLUMN, SEED_COLUMN])
              if c in names]
    table = pf.read(columns=wanted)
    prompt_type = table.schema.field(config.prompt_column).type
    if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type) or pa.types.is_null(prompt_type)):
        raise InputError(f"{uri}: prompt column {config.prompt_column!r} has type {prompt_type}, expected string")
    n = table.num_rows

    def col(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    keys = None
    if KEY_COLUMN in table.column_names:
        keys = id_to_key(table.column(KEY_COLUMN)).to_pylist()
    return _Rows(keys, col(config.prompt_column), col(NEGATIVE_COLUMN), col(SEED_COLUMN))


_PARSERS = {"txt": _parse_txt, "jsonl": _parse_jsonl, "csv": _parse_csv, "parquet": _parse_parquet}


def _row_error(exc: Exception) -> str:
    """An error row's message, in every stage's format: `input: <ExceptionType>: <message>`."""
    return error_text("input", exc)


BAD_SEED_ERROR = "input: ValueError: seed "  # rows whose seed cell is bad keep a null seed


def _seed_value(value: Any) -> tuple[int | None, str | None]:
    """(seed, error) from a seed cell: ints (or integral strings, csv) in [0, 2**63)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None, _row_error(ValueError(f"seed {value!r} is not an integer"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None, _row_error(ValueError(f"seed {value!r} is not an integer"))
    if not 0 <= value < MAX_SEED:
        return None, _row_error(ValueError(f"seed {value} is outside [0, 2**63)"))
    return value, None


def _rows_to_table(rows: _Rows, keys: list[str]) -> pa.Table:
    prompts, negatives, seeds, errors = [], [], [], []
    for prompt, negative, seed in zip(rows.prompts, rows.negatives, rows.seeds, strict=True):
        error = None
        if prompt is None:
            error = _row_error(ValueError("the prompt is null"))
        elif not isinstance(prompt, str):
            error, prompt = _row_error(TypeError(f"the prompt must be text, got {type(prompt).__name__}")), None
        if negative is not None and not isinstance(negative, str):
            error = error or _row_error(TypeError(f"negative_prompt must be text, got {type(negative).__name__}"))
            negative = None
        seed_value, seed_error = _seed_value(seed)
        prompts.append(prompt)
        negatives.append(negative)
        seeds.append(seed_value)
        errors.append(error or seed_error)
    return pa.table({PROMPT_KEY: pa.array(keys, pa.string()), PROMPT: pa.array(prompts, pa.string()),
                     NEGATIVE_COLUMN: pa.array(negatives, pa.string()), SEED_COLUMN: pa.array(seeds, pa.int64()),
                     C.ERROR: pa.array(errors, pa.string())}, schema=PROMPT_TABLE_SCHEMA)


# ---- planning ------------------------------------------------------------------------------------------------------
@dataclass
class PromptPlan:
    root: Location
    files: list[str]  # fsspec paths
    prompts: pa.Table  # PROMPT_TABLE_SCHEMA, one row per prompt, keys unique
    skipped_files: list[str] = field(default_factory=list)  # named by --input, not read (relative to `root`)

    @property
    def prompt_keys(self) -> pa.Array:
        return self.prompts[PROMPT_KEY].combine_chunks()

    def image_keys(self, images_per_prompt: int) -> pa.Array:
        """Every (prompt key, image index) pair's key: what the output must hold exactly once."""
        return pa.array([image_key(k, j) for k in self.prompt_keys.to_pylist() for j in range(images_per_prompt)],
                        pa.string())


def plan_prompts(config: Any, storage_options: Mapping[str, Any] | None = None) -> PromptPlan:
    """Read and check every prompt file named by `config.input` (needs `input`, `prompt_column`); raises InputError
    before any work. The prompt table is held by the driver (text only: ~100 bytes a prompt)."""
    extensions = ", ".join("." + e for e in FORMAT_OF_EXTENSION)
    listing = list_input(config.input, storage_options, list(FORMAT_OF_EXTENSION), f"prompt files ({extensions})")
    location, root, files = listing.root, listing.root.path, listing.paths
    tables = []
    for path in files:
        uri = location.uri_of(path)
        fmt = FORMAT_OF_EXTENSION.get(path.rsplit(".", 1)[-1].lower())
        if fmt is None:  # a single file named by --input is listed whatever its extension
            raise InputError(f"{uri}: not a prompt file (the format comes from the extension: {extensions})")
        try:
            with location.fs.open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InputError(f"{uri}: cannot read: {type(exc).__name__}: {exc}") from None
        rows = _PARSERS[fmt](data, uri, config)
        if rows.keys is not None:
            keys = rows.keys
        else:
            prefix = f"{relative_key(root, path)}:" if len(files) > 1 else ""
            keys = [f"{prefix}{i}" for i in range(1, len(rows.prompts) + 1)]
        tables.append(_rows_to_table(rows, keys))
    prompts = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    check_unique_keys(prompts[PROMPT_KEY].combine_chunks(), f"prompt {KEY_COLUMN!r} column or row numbers")
    logger.info("input %s: %d prompt files, %d prompts (%d error rows)%s", config.input, len(files), prompts.num_rows,
                prompts.num_rows - prompts[C.ERROR].null_count,
                f" ({len(listing.skipped)} skipped)" if listing.skipped else "")
    return PromptPlan(location, files, prompts, listing.skipped_names)


# ---- expansion (prompt rows -> image rows) --------------------------------------------------------------------------
class ExpandStage(Stage):
    """One row per (prompt, image index): key `<prompt key>-<index>`, the image's seed, the effective negative
    prompt; rows with an input error become error rows (one per image, so reconciliation counts every pair)."""

    name = "expand"
    requires = tuple(Column(f.name, "planned prompt column") for f in PROMPT_TABLE_SCHEMA)
    produces = tuple(Column(f.name, "image row column") for f in IMAGE_ROW_SCHEMA)

    def __init__(self, images_per_prompt: int, base_seed: int, negative_prompt: str | None = None) -> None:
        self.images_per_prompt, self.base_seed, self.negative_prompt = images_per_prompt, base_seed, negative_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        out: dict[str, list[Any]] = {f.name: [] for f in IMAGE_ROW_SCHEMA}
        for row in batch.select(PROMPT_TABLE_SCHEMA.names).to_pylist():
            negative = row[NEGATIVE_COLUMN] if row[NEGATIVE_COLUMN] is not None else self.negative_prompt
            for j in range(self.images_per_prompt):
                error = row[C.ERROR]
                seed = None if error and error.startswith(BAD_SEED_ERROR) else \
                    image_seed(row[SEED_COLUMN], self.base_seed, row[PROMPT_KEY], j)
                out[C.KEY].append(image_key(row[PROMPT_KEY], j))
                out[PROMPT_KEY].append(row[PROMPT_KEY])
                out[IMAGE_INDEX].append(j)
                out[PROMPT].append(row[PROMPT])
                out[NEGATIVE_COLUMN].append(negative)
                out[SEED_COLUMN].append(seed)
                out[C.STATUS].append(C.STATUS_ERROR if error else C.STATUS_OK)
                out[C.ERROR].append(error)
        return pa.table(out, schema=IMAGE_ROW_SCHEMA)


def check_image_keys(keys: pa.Array) -> None:
    """Image keys must be unique too (they are, when prompt keys are: see `image_key`); a cheap guard."""
    counts = pc.value_counts(keys)
    if len(counts) != len(keys):
        raise InputError("image keys <prompt key>-<index> are not unique")

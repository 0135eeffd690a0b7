"""Prompt lists for the paint job: plan (list files, parse, check columns and keys - before any work), derive the
per-image seeds, expand prompts into image rows.

Formats (by file extension; a folder/prefix may mix them): `.txt` (one prompt per line; blank lines are no prompts,
counted as `blank_lines`), `.jsonl` (one JSON object per line), `.csv` (header row), `.tsv` (header row, tab-separated,
no quoting: PartiPrompts' `Prompt\\tCategory\\tChallenge\\tNote`), `.parquet`. Columns: `--prompt-column` (default
`prompt`; several candidates: the first one present in each file, logged per file), and optionally the key column
(`--key-column`, default `key`), `negative_prompt`, `seed`, and the `--keep-columns` (any column, carried into every
image row of the prompt; `source=name` renames; types unified over the files, null where a file lacks one).

* Prompt keys: the key column (any type, as a string; every row needs one, unique across all files; a `--key-column`
  named explicitly must be in every file), else the 1-based line/record/row number (txt: the line number, blank
  lines counted; jsonl: the number among its records; csv/tsv: the record number after the header; parquet: the row
  number). With several input files and no key column the key is `<file path relative to --input>:<number>`.
* A missing prompt column, a key column missing on some rows, duplicate or empty keys, undecodable UTF-8 or a
  malformed JSON line: `InputError` before any work. A null prompt, a non-text prompt or a bad seed value: an
  error ROW (status "error") - the rest of the job runs.
* Prompt text is kept verbatim (empty, whitespace-only, control characters, `<ans>`, `</s>`, ...): the model
  escapes it - except that a blank .txt line is a separator, not a prompt. txt lines are split on "\\n" only (a
  trailing "\\r" is dropped), never on other line separators, which are prompt text.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import columns as C
from ..core.columns import keep_column_pairs
from ..core.inputs import InputError, check_unique_keys, id_to_key, list_input
from ..core.stage import SAMPLE, Column, Stage, error_text, sample_text
from ..core.storage import Location, relative_key
from .schema import (IMAGE_INDEX, IMAGE_ROW_SCHEMA, KEY_COLUMN, NEGATIVE_COLUMN, PROMPT, PROMPT_KEY,
                     PROMPT_TABLE_SCHEMA, SEED_COLUMN)

logger = logging.getLogger(__name__)

FORMAT_OF_EXTENSION = {"txt": "txt", "jsonl": "jsonl", "csv": "csv", "tsv": "tsv", "parquet": "parquet"}
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
class _Wanted:
    """The columns to look for in every prompt file (from the config)."""

    prompt: list[str]  # --prompt-column candidates: the first one a file has is its prompt column
    key: str | None  # --key-column: required in every file; None: `key` where a file has it
    keep: list[str]  # --keep-columns' source columns (optional per file)

    @classmethod
    def of(cls, config: Any) -> _Wanted:
        prompt = config.prompt_column
        candidates = [c.strip() for c in prompt.split(",")] if isinstance(prompt, str) else list(prompt)
        keep = [source for source, _ in keep_column_pairs(getattr(config, "keep_columns", None) or [])]
        return cls([c for c in candidates if c], getattr(config, "key_column", None), keep)

    @property
    def key_column(self) -> str:
        return self.key or KEY_COLUMN

    def prompt_column(self, names: list[str], uri: str, what: str) -> str:
        for candidate in self.prompt:
            if candidate in names:
                return candidate
        wanted = f"prompt column {self.prompt[0]!r}" if len(self.prompt) == 1 else \
            f"any of the prompt columns {self.prompt}"
        raise InputError(f"{uri}: missing {wanted} (--prompt-column). {what}: {names}")

    def check_key(self, names: list[str], uri: str, what: str) -> None:
        if self.key is not None and self.key not in names:
            raise InputError(f"{uri}: missing key column {self.key!r} (--key-column: required in every file). "
                             f"{what}: {names}")


@dataclass
class _Rows:
    """Parsed rows of one file, as Python lists (None: absent/null), and the --keep-columns it has."""

    keys: list[Any] | None  # None: the file has no key column
    prompts: list[Any]
    negatives: list[Any]
    seeds: list[Any]
    extra: dict[str, pa.Array] = field(default_factory=dict)  # keep columns the file has, by source name
    prompt_column: str | None = None  # the --prompt-column candidate used (None: .txt)
    numbers: list[int] | None = None  # each prompt's line/record/row number when they are not 1..n (.txt)
    blank: int = 0  # .txt: blank lines, which are no prompts


def _text(data: bytes, uri: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not UTF-8 text ({exc})") from exc
    return text.removeprefix("\ufeff")


def _typed(values: list[Any], uri: str, column: str) -> pa.Array:
    """A --keep-columns column of a jsonl file as Arrow (types inferred from the JSON values)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"{uri}: --keep-columns {column!r} holds values of types that do not combine ({exc})"
                         ) from None


def _parse_txt(data: bytes, uri: str, wanted: _Wanted) -> _Rows:
    if wanted.key is not None:
        raise InputError(f"{uri}: a .txt file has no columns, so no key column {wanted.key!r} (--key-column); "
                         "give its prompts keys in a .jsonl/.csv/.tsv/.parquet file instead")
    text = _text(data, uri)
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the file's final newline ends the last line; it starts no new prompt
        lines.pop()
    prompts, numbers = [], []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if line.strip():  # a blank line separates prompts, it is none; the key stays the line number
            prompts.append(line)
            numbers.append(number)
    n = len(prompts)
    return _Rows(None, prompts, [None] * n, [None] * n, numbers=numbers, blank=len(lines) - n)


def _parse_jsonl(data: bytes, uri: str, wanted: _Wanted) -> _Rows:
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
    if not records:
        return _Rows(None, [], [], [])
    seen = list(dict.fromkeys(k for r in records[:100] for k in r))
    col = next((c for c in wanted.prompt if any(c in r for r in records)), None)
    if col is None:
        wanted.prompt_column(seen, uri, "Fields seen")  # raises, naming the candidates
    key_column = wanted.key_column
    has_key = any(key_column in r for r in records)
    if wanted.key is not None and not has_key:
        wanted.check_key(seen, uri, "Fields seen")
    if has_key and not all(key_column in r for r in records):
        missing = sum(key_column not in r for r in records)
        raise InputError(f"{uri}: {missing} records have no {key_column!r} while others do: every row needs one")
    keys = [None if r.get(key_column) is None else str(r[key_column]) for r in records] if has_key else None
    extra = {c: _typed([r.get(c) for r in records], uri, c) for c in wanted.keep if any(c in r for r in records)}
    return _Rows(keys, [r.get(col) for r in records], [r.get(NEGATIVE_COLUMN) for r in records],
                 [r.get(SEED_COLUMN) for r in records], extra, col)


def _parse_delimited(data: bytes, uri: str, wanted: _Wanted, tsv: bool) -> _Rows:
    # .tsv as benchmarks ship it (PartiPrompts): tab-separated, no quoting - a quote is part of the prompt
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    reader = csv.DictReader(io.StringIO(_text(data, uri), newline=""), **options)
    header = list(reader.fieldnames or [])
    col = wanted.prompt_column(header, uri, "Header")
    wanted.check_key(header, uri, "Header")
    rows = list(reader)

    def cells(name: str) -> list[Any]:
        return [r.get(name) for r in rows]

    def col_or_none(name: str) -> list[Any]:
        # a short record lacks trailing cells (None); an empty negative/seed cell means "not given"
        return [(r.get(name) or None) for r in rows] if name in header else [None] * len(rows)

    key_column = wanted.key_column
    keys = cells(key_column) if key_column in header else None
    extra = {c: pa.array(cells(c), pa.string()) for c in wanted.keep if c in header}
    return _Rows(keys, cells(col), col_or_none(NEGATIVE_COLUMN), col_or_none(SEED_COLUMN), extra, col)


def _parse_csv(data: bytes, uri: str, wanted: _Wanted) -> _Rows:
    return _parse_delimited(data, uri, wanted, tsv=False)


def _parse_tsv(data: bytes, uri: str, wanted: _Wanted) -> _Rows:
    return _parse_delimited(data, uri, wanted, tsv=True)


def _parse_parquet(data: bytes, uri: str, wanted: _Wanted) -> _Rows:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{uri}: not a Parquet file, which its .parquet name says ({exc})") from None
    names = pf.schema_arrow.names
    col = wanted.prompt_column(names, uri, "Available columns")
    wanted.check_key(names, uri, "Available columns")
    key_column = wanted.key_column
    columns = [c for c in dict.fromkeys([col, key_column, NEGATIVE_COLUMN, SEED_COLUMN, *wanted.keep]) if c in names]
    table = pf.read(columns=columns)
    prompt_type = table.schema.field(col).type
    if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type) or pa.types.is_null(prompt_type)):
        raise InputError(f"{uri}: prompt column {col!r} has type {prompt_type}, expected string")
    n = table.num_rows

    def values(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    keys = None
    if key_column in table.column_names:
        keys = id_to_key(table.column(key_column)).to_pylist()
    extra = {c: table.column(c).combine_chunks() for c in wanted.keep if c in table.column_names}
    return _Rows(keys, values(col), values(NEGATIVE_COLUMN), values(SEED_COLUMN), extra, col)


_PARSERS = {"txt": _parse_txt, "jsonl": _parse_jsonl, "csv": _parse_csv, "tsv": _parse_tsv,
            "parquet": _parse_parquet}


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


def _rows_to_table(rows: _Rows, keys: list[str], keep: Sequence[tuple[str, pa.Field]] = ()) -> pa.Table:
    """The planned prompt table of one file: PROMPT_TABLE_SCHEMA, then the keep columns `keep` ((source column,
    output field)), cast to the field's type (the plan unified them over all files; null where the file lacks one)."""
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
    table = pa.table({PROMPT_KEY: pa.array(keys, pa.string()), PROMPT: pa.array(prompts, pa.string()),
                      NEGATIVE_COLUMN: pa.array(negatives, pa.string()), SEED_COLUMN: pa.array(seeds, pa.int64()),
                      C.ERROR: pa.array(errors, pa.string())}, schema=PROMPT_TABLE_SCHEMA)
    for source, out in keep:
        values = rows.extra.get(source)
        table = table.append_column(out, pa.nulls(len(keys), out.type) if values is None else
                                    values if values.type == out.type else pc.cast(values, out.type))
    return table


def _keep_fields(wanted_keep: Sequence[tuple[str, str]], parsed: list[tuple[str, _Rows]]) -> list[tuple[str, pa.Field]]:
    """(source column, output field) of each --keep-columns entry: one type over the files that have the column
    (Arrow's permissive promotion: null -> anything, int32 -> int64, ...). InputError for a column that no file has
    (a typo) or whose types do not combine (naming the files)."""
    fields = []
    for source, target in wanted_keep:
        have = [(uri, rows.extra[source].type) for uri, rows in parsed if source in rows.extra]
        if not have:
            raise InputError(f"--keep-columns {source!r} is in none of the {len(parsed)} prompt files")
        distinct = list(dict.fromkeys(t for _, t in have))
        try:
            typ = distinct[0] if len(distinct) == 1 else pa.unify_schemas(
                [pa.schema([pa.field(source, t)]) for t in distinct], promote_options="permissive").field(source).type
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            examples = "; ".join(f"{t} in {next(u for u, v in have if v == t)}" for t in distinct[:SAMPLE])
            raise InputError(f"--keep-columns {source!r} has types that do not combine across the prompt files: "
                             f"{examples}") from None
        fields.append((source, pa.field(target, typ)))
    return fields


# ---- planning ------------------------------------------------------------------------------------------------------
@dataclass
class PromptPlan:
    root: Location
    files: list[str]  # fsspec paths
    prompts: pa.Table  # PROMPT_TABLE_SCHEMA + keep_fields, one row per prompt, keys unique
    keep_fields: list[pa.Field] = field(default_factory=list)  # --keep-columns, by output name
    blank_lines: int = 0  # blank lines of .txt files (no prompts)
    skipped_files: list[str] = field(default_factory=list)  # named by --input, not read (relative to `root`)

    @property
    def prompt_keys(self) -> pa.Array:
        return self.prompts[PROMPT_KEY].combine_chunks()

    def image_keys(self, images_per_prompt: int) -> pa.Array:
        """Every (prompt key, image index) pair's key: what the output must hold exactly once."""
        return pa.array([image_key(k, j) for k in self.prompt_keys.to_pylist() for j in range(images_per_prompt)],
                        pa.string())


def plan_prompts(config: Any, storage_options: Mapping[str, Any] | None = None) -> PromptPlan:
    """Read and check every prompt file named by `config.input` (needs `input`, `prompt_column`; optionally
    `key_column`, `keep_columns`); raises InputError before any work. The prompt table is held by the driver (text
    only: ~100 bytes a prompt)."""
    extensions = ", ".join("." + e for e in FORMAT_OF_EXTENSION)
    listing = list_input(config.input, storage_options, list(FORMAT_OF_EXTENSION), f"prompt files ({extensions})")
    location, root, files = listing.root, listing.root.path, listing.paths
    wanted = _Wanted.of(config)
    parsed: list[tuple[str, _Rows]] = []
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
        parsed.append((uri, _PARSERS[fmt](data, uri, wanted)))
    keep = _keep_fields(keep_column_pairs(getattr(config, "keep_columns", None) or []), parsed)
    tables = []
    for path, (_, rows) in zip(files, parsed):
        if rows.keys is not None:
            keys = rows.keys
        else:
            prefix = f"{relative_key(root, path)}:" if len(files) > 1 else ""
            keys = [f"{prefix}{i}" for i in (rows.numbers or range(1, len(rows.prompts) + 1))]
        tables.append(_rows_to_table(rows, keys, keep))
    prompts = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    check_unique_keys(prompts[PROMPT_KEY].combine_chunks(),
                      f"prompt {wanted.key_column!r} column or line/row numbers")
    blank = sum(rows.blank for _, rows in parsed)
    logger.info("input %s: %d prompt files, %d prompts (%d error rows, %d blank .txt lines skipped)%s", config.input,
                len(files), prompts.num_rows, prompts.num_rows - prompts[C.ERROR].null_count, blank,
                f" ({len(listing.skipped)} files skipped)" if listing.skipped else "")
    if len(wanted.prompt) > 1:  # candidates: say which column each file's prompts came from
        used: dict[str, list[str]] = {}
        for path, (_, rows) in zip(files, parsed):
            if rows.prompt_column is not None:
                used.setdefault(rows.prompt_column, []).append(relative_key(root, path))
        logger.info("prompt column (--prompt-column %s) per file: %s", ",".join(wanted.prompt),
                    "; ".join(f"{col!r} in {len(names)} file(s): {sample_text(names)}" for col, names in used.items()))
    return PromptPlan(location, files, prompts, [f for _, f in keep], blank, listing.skipped_names)


# ---- expansion (prompt rows -> image rows) --------------------------------------------------------------------------
class ExpandStage(Stage):
    """One row per (prompt, image index): key `<prompt key>-<index>`, the image's seed, the effective negative
    prompt; rows with an input error become error rows (one per image, so reconciliation counts every pair). The
    prompt table's columns past PROMPT_TABLE_SCHEMA (--keep-columns) are repeated on every image row of their
    prompt, after IMAGE_ROW_SCHEMA's columns."""

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
        table = pa.table(out, schema=IMAGE_ROW_SCHEMA)
        extra = [name for name in batch.column_names if name not in PROMPT_TABLE_SCHEMA.names]
        if extra:
            # row i of the batch feeds image rows i * n .. i * n + n - 1 (the loop above, in order)
            take = pa.array([i for i in range(batch.num_rows) for _ in range(self.images_per_prompt)], pa.int64())
            for name in extra:
                table = table.append_column(batch.schema.field(name), batch.column(name).take(take))
        return table


def check_image_keys(keys: pa.Array) -> None:
    """Image keys must be unique too (they are, when prompt keys are: see `image_key`); a cheap guard."""
    counts = pc.value_counts(keys)
    if len(counts) != len(keys):
        raise InputError("image keys <prompt key>-<index> are not unique")

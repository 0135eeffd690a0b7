"""The caption job's columns and output schema, in one place.

Output rows (parquet; the `json` member of webdataset output holds the same fields):

    key             string   the input row id (parquet: --id-column as a string; webdataset: __key__; images:
                             the path relative to --input)
    caption         string   the model's answer; null when status is "error"
    status          string   "ok" | "error"
    error_message   string   null when ok; "<stage>: <ExceptionType>: <message>" otherwise
    question        string   the question asked
    model           string   the --model value
    finished        bool     the answer ended by itself (false: cut at max_new_tokens); null on error
    width, height   int32    the image's size as stored, after EXIF orientation (before the --max-image-side
                             downscale); null when it could not be decoded
    sha256          string   hex SHA-256 of the input image bytes; null when there were none
    image_flagged   bool     the image safety checker's verdict (--image-safety); null without the checker or on
                             error
    strategy, max_new_tokens, beam_size, repetition_penalty, length_penalty, temperature, top_p, seed
                             the generation settings used; null for those the strategy ignores (greedy: beam_size,
                             length_penalty, temperature, top_p, seed; beam: top_p, seed; sample: beam_size,
                             length_penalty)
    <keep columns>           copied from the input (--keep-columns; `source=name` writes column source as name)

Columns that only travel between stages start with `__` and never reach the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

# the columns every job's rows have (re-exported: this module is the caption output's one reference)
from ..core.columns import ERROR, INTERNAL_PREFIX, KEY, MODEL, STATUS, STATUS_ERROR, STATUS_OK  # noqa: F401
from ..core.columns import keep_column_problems
from ..core.output.files import json_member

CAPTION = "caption"
QUESTION = "question"
FINISHED = "finished"
IMAGE_WIDTH = "width"
IMAGE_HEIGHT = "height"
SHA256 = "sha256"
IMAGE_FLAGGED = "image_flagged"

GENERATION_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("strategy", pa.string()),
    ("max_new_tokens", pa.int32()),
    ("beam_size", pa.int32()),
    ("repetition_penalty", pa.float64()),
    ("length_penalty", pa.float64()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("seed", pa.int64()),
)

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR, pa.string()),
    pa.field(QUESTION, pa.string()),
    pa.field(MODEL, pa.string()),
    pa.field(FINISHED, pa.bool_()),
    pa.field(IMAGE_WIDTH, pa.int32()),
    pa.field(IMAGE_HEIGHT, pa.int32()),
    pa.field(SHA256, pa.string()),
    pa.field(IMAGE_FLAGGED, pa.bool_()),
    *(pa.field(name, typ) for name, typ in GENERATION_FIELDS),
)
OUTPUT_COLUMNS = tuple(f.name for f in BASE_FIELDS)

# Between-stage columns (never written).
IMAGE = "__image"  # encoded image bytes (null: read the path in IMAGE_PATH)
IMAGE_PATH = "__image_path"  # path/URI to read the image from (parquet string columns)
PIXELS = "__pixels"  # decoded RGB, row-major uint8 bytes of height x width x 3
WIDTH = "__width"  # of the decoded pixels (after the --max-image-side downscale)
HEIGHT = "__height"


def output_schema(keep: Sequence[pa.Field] = ()) -> pa.Schema:
    return pa.schema([*BASE_FIELDS, *keep])


def reserved_column_problems(keep_columns: Sequence[str]) -> list[str]:
    """`--keep-columns` against the caption output's own columns (`caption=alt_text` keeps img2dataset's caption)."""
    return keep_column_problems(keep_columns, OUTPUT_COLUMNS)


def caption_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The caption job's WebDataset sample: `<k>.txt` (the caption; empty on error) and `<k>.json` (the full row).
    Module-level, so the output store pickles it into the write tasks."""
    return [("txt", (row[CAPTION] or "").encode("utf-8")), ("json", json_member(row))]

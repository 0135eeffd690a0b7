"""The paint job's column names - prompt files, the planned prompt table, image rows, output - and its WebDataset
sample layout, in one place.

One row per (prompt key, image index):

    key              string   `<prompt key>-<image index>` (the WebDataset `__key__`)
    prompt_key       string   the prompt's key (input `key` column, else its row/line number)
    image_index      int32    0 .. --images-per-prompt - 1
    prompt           string   the prompt, verbatim (null only for a null-prompt error row)
    negative_prompt  string   the effective negative prompt (row's, else --negative-prompt; null: none)
    seed             int64    the image's seed (see `paint.prompts`)
    status           string   "ok" | "blocked" (the prompt checker refused it: no image) | "error"
    error_message    string   null unless status is "error"; "<stage>: <ExceptionType>: <message>"
    steps, guidance_scale, scheduler, size ("WxH"), width, height, model, image_format
                              the settings used
    prompt_flagged, prompt_score, nsfw, rerank_score, candidate, prompt_truncated
                              the model's per-image results (null where the component is off / on error)
    <keep columns>            the prompt row's --keep-columns (`source=name`: column source as name), on every image
                              row of the prompt; null where the file lacks the column
    image            binary   parquet only: the encoded image (null unless ok). WebDataset: the `<k>.<png|jpg|webp>`
                              member instead, and `<k>.json` holds every other column.

`key` and `status` are what the shared output store (`pipelines.core.output`) reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from ..core.columns import ERROR, KEY, MODEL, STATUS, keep_column_problems
from ..core.output.files import json_member

KEY_COLUMN = "key"  # the prompt-key column of prompt files when --key-column is not given (optional)
NEGATIVE_COLUMN = "negative_prompt"
SEED_COLUMN = "seed"

# columns of the planned prompt table (one row per prompt)
PROMPT_KEY = "prompt_key"
PROMPT = "prompt"
PROMPT_TABLE_SCHEMA = pa.schema([
    pa.field(PROMPT_KEY, pa.string(), nullable=False),
    pa.field(PROMPT, pa.string()),
    pa.field(NEGATIVE_COLUMN, pa.string()),  # null: use --negative-prompt
    pa.field(SEED_COLUMN, pa.int64()),  # null: derive
    pa.field(ERROR, pa.string()),  # set: the row is an error row
])
IMAGE_INDEX = "image_index"
IMAGE_ROW_SCHEMA = pa.schema([
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(PROMPT_KEY, pa.string(), nullable=False),
    pa.field(IMAGE_INDEX, pa.int32(), nullable=False),
    pa.field(PROMPT, pa.string()),
    pa.field(NEGATIVE_COLUMN, pa.string()),
    pa.field(SEED_COLUMN, pa.int64()),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(ERROR, pa.string()),
])


BLOCKED = "blocked"
IMAGE_BYTES = "image"
IMAGE_FORMATS = ("png", "jpg", "webp")
# the job's scheduler names and viscpm's
VISCPM_SCHEDULER = {"ddpm": "ddpm", "dpmsolver": "dpmsolver++"}
JOB_SCHEDULER = {v: k for k, v in VISCPM_SCHEDULER.items()}
SCHEDULERS = tuple(VISCPM_SCHEDULER)

SETTINGS_FIELDS: tuple[pa.Field, ...] = (
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("scheduler", pa.string()),
    pa.field("size", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field(MODEL, pa.string()),
    pa.field("image_format", pa.string()),
)
# attribute names of viscpm.PaintResult
PAINT_RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("prompt_flagged", pa.bool_()),
    pa.field("prompt_score", pa.float64()),
    pa.field("nsfw", pa.bool_()),
    pa.field("rerank_score", pa.float64()),
    pa.field("candidate", pa.int32()),
    pa.field("prompt_truncated", pa.bool_()),
)
METADATA_FIELDS: tuple[pa.Field, ...] = (*IMAGE_ROW_SCHEMA, *SETTINGS_FIELDS, *PAINT_RESULT_FIELDS)
METADATA_SCHEMA = pa.schema(METADATA_FIELDS)
OUTPUT_SCHEMA = pa.schema([*METADATA_FIELDS, pa.field(IMAGE_BYTES, pa.binary())])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)


def output_schema(keep: Sequence[pa.Field] = ()) -> pa.Schema:
    """The output columns with the prompt files' --keep-columns (after the metadata, before the image bytes)."""
    return pa.schema([*METADATA_FIELDS, *keep, pa.field(IMAGE_BYTES, pa.binary())])


def reserved_column_problems(keep_columns: Sequence[str]) -> list[str]:
    """`--keep-columns` against the paint output's own columns (`key=source_key` keeps a file's `key` column)."""
    return keep_column_problems(keep_columns, OUTPUT_COLUMNS)


def paint_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """WebDataset sample of one image row: `<k>.<image_format>` (only when there is an image) and `<k>.json`
    (every column but the image bytes). Module-level, so `WriteStage(tar_members=paint_members)` pickles."""
    image = row.get(IMAGE_BYTES)
    meta = {k: v for k, v in row.items() if k != IMAGE_BYTES}
    members: list[tuple[str, bytes]] = []
    if image is not None:
        members.append((row.get("image_format") or "png", bytes(image)))
    members.append(("json", json_member(meta)))
    return members

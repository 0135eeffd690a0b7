"""Column names every job's rows share: the row id, its status and error, the model, and the bookkeeping columns a
model stage adds for the write stage (which folds them into per-actor stats). Each job's own output columns live
in its `schema` module. Columns that only travel between stages start with `__` and never reach the output."""

from __future__ import annotations

from collections.abc import Sequence

KEY = "key"
STATUS = "status"
ERROR = "error_message"
MODEL = "model"
STATUS_OK = "ok"
STATUS_ERROR = "error"

# model-actor bookkeeping, aggregated by the write stage into per-actor stats
ACTOR = "__actor"
NODE = "__node"
DEVICE = "__device"
GPU_IDS = "__gpu_ids"
MODEL_SECONDS = "__model_s"  # the row's share of its batch's time inside the model
BATCH_START = "__t0"
BATCH_END = "__t1"
BOOKKEEPING = (ACTOR, NODE, DEVICE, GPU_IDS, MODEL_SECONDS, BATCH_START, BATCH_END)
INTERNAL_PREFIX = "__"


def keep_column_pairs(keep_columns: Sequence[str]) -> list[tuple[str, str]]:
    """`--keep-columns` entries as (input column, output column): `name` keeps a column under its own name,
    `source=output_name` renames it (so an input column named like an output column can be kept). Both jobs."""
    pairs = []
    for entry in keep_columns:
        source, sep, target = entry.partition("=")
        pairs.append((source.strip(), target.strip()) if sep else (entry.strip(), entry.strip()))
    return pairs


def keep_column_problems(keep_columns: Sequence[str], output_columns: Sequence[str]) -> list[str]:
    """What is wrong with `--keep-columns`: an empty name, an output name taken by the job's own columns (the message
    suggests the rename), a reserved `__` name, two entries writing one output column."""
    problems = []
    pairs = keep_column_pairs(keep_columns)
    for entry, (source, target) in zip(keep_columns, pairs):
        if not source or not target:
            problems.append(f"--keep-columns {entry!r}: expected NAME or SOURCE=OUTPUT_NAME")
        elif target in output_columns:
            problems.append(f"--keep-columns {entry!r} collides with the output column {target!r}: keep it under "
                            f"another name with {source}=<new name> (e.g. {source}=source_{target}). Output "
                            f"columns: {list(output_columns)}")
        elif target.startswith(INTERNAL_PREFIX):
            problems.append(f"--keep-columns {entry!r}: names starting with {INTERNAL_PREFIX!r} are reserved")
    targets = [t for _, t in pairs]
    if len(set(targets)) != len(targets):
        problems.append(f"--keep-columns writes an output column twice: {list(keep_columns)}")
    return problems

"""Column names every job's rows share: the row id, its status and error, the model, and the bookkeeping columns a
model stage adds for the write stage (which folds them into per-actor stats). Each job's own output columns live
in its `schema` module. Columns that only travel between stages start with `__` and never reach the output."""

from __future__ import annotations

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

"""The output room: `OutputStore` (data files + bookkeeping of one job's output, resume, reconciliation) and
`WriteStage` (the pipeline's last stage, which writes through the store)."""

from .store import OutputConflictError, OutputStore, Reconciliation, RunStart, reconcile
from .write import STATS_SCHEMA, WriteStage, merge_actor_stats

__all__ = ["OutputConflictError", "OutputStore", "Reconciliation", "RunStart", "STATS_SCHEMA", "WriteStage",
           "merge_actor_stats", "reconcile"]

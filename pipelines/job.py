"""The caption job, wired: config -> plan -> lazy Ray Dataset -> streamed execution -> clean-up -> reconciliation.

    read (Ray read_*) -> normalize -> resume-filter -> decode (CPU tasks, autoscaled)
        -> caption (fixed actor pool, `num_gpus` each) -> write (tasks: one file + checkpoint per batch)

The driver only consumes one small stats row per written file (streaming: nothing is materialised), logs
progress, and at the end reads the ids of the output's data files back to reconcile them with the input's.
Expects Ray to be initialised by the caller (`jobs/caption.py`); this module configures no logging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import schema as S
from .captioner import CaptionStage
from .config import CaptionJobConfig
from .decode import DecodeStage
from .readers import InputPlan, KeyFilter, normalize_stage, plan_input, read_dataset
from .models import check_model_folders
from .resume import OutputStore
from .runner import JobResult, Resources, RunStart, run_job
from .storage import locate, resolve_storage_options
from .writers import WriteStage

logger = logging.getLogger(__name__)


class CaptionJobResult(JobResult):
    job = "caption"
    unit = "rows"


def build_pipeline(plan: InputPlan, config: CaptionJobConfig, storage_options: dict[str, Any], store: OutputStore,
                   run: int, todo: pa.Array | None, resources: Resources) -> Any:
    """The lazy Dataset from input to written-file stats. `todo`: only these keys (None: all)."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = read_dataset(plan, config)
    ds = ds.map_batches(normalize_stage(plan, config), batch_format="pyarrow", batch_size=None)
    if todo is not None:
        # ship the smaller of the two sets; both select the same rows
        keep = len(todo) <= len(plan.keys) - len(todo)
        keys = todo if keep else pc.filter(plan.keys, pc.invert(pc.is_in(plan.keys, value_set=todo)))
        ds = ds.map_batches(KeyFilter(ray.put(keys), keep=keep), batch_format="pyarrow", batch_size=None)
    # Small blocks are what spreads rows over decode tasks and caption actors: Ray hands an actor whole blocks,
    # and one Parquet file or shard can arrive as a single block of thousands of rows
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size)
    # max_calls=0 is Ray's default for tasks (workers are reused); it is spelled out because differing remote args
    # also keep Ray Data from fusing decode into a CPU caption actor whose CPU request happens to be equal -
    # decode must stay autoscaled tasks running beside the actors, not inside them
    ds = ds.map_batches(DecodeStage(config.max_image_side, config.max_image_pixels, plan.root.uri, storage_options),
                        batch_format="pyarrow", batch_size=config.decode_batch_size, num_cpus=resources.decode_cpus,
                        max_calls=0)
    ds = ds.map_batches(
        CaptionStage, fn_constructor_kwargs={
            "model": config.model, "generation": config.generation_kwargs(),
            "use_gpu": resources.gpus_per_worker > 0, "model_label": config.model,
            "storage_options": storage_options, "cache_dir": config.model_cache_dir,
            "model_batch_size": config.batch_size,
            "torch_threads": config.torch_threads},
        # one call per block: Ray's per-call overhead is paid once per block, not once per model batch
        batch_format="pyarrow", batch_size=max(config.batch_size, config.decode_batch_size),
        compute=ActorPoolStrategy(size=resources.num_workers),
        num_gpus=resources.gpus_per_worker or None, num_cpus=resources.cpus_per_worker)
    schema = S.output_schema(plan.keep_fields)
    return ds.map_batches(WriteStage(store.location, run, config.output_format, schema), batch_format="pyarrow",
                          batch_size=config.rows_per_file, num_cpus=resources.write_cpus)


def run_caption_job(config: CaptionJobConfig, ray_init: Callable[[], None] | None = None) -> CaptionJobResult:
    """Run (or resume) one caption job; returns its result - `succeeded` is False when reconciliation failed.
    Raises InputError / OutputConflictError / ClusterResourcesError / ValueError before any work for bad inputs,
    models or outputs. `ray_init`: starts Ray once those checks passed (default: the caller initialised it)."""
    started = time.monotonic()
    config.validate()
    storage_options = resolve_storage_options(config.storage_options)
    check_model_folders(config.model_sources(), storage_options)
    plan = plan_input(config, storage_options)  # before touching the output: a bad input changes nothing
    store = OutputStore(locate(config.output, storage_options), config.output_format, job_name="caption")

    def build(start: RunStart, resources: Resources) -> Any:
        return build_pipeline(plan, config, storage_options, store, start.run, start.only, resources)

    result = run_job(config, store, plan.keys, build, CaptionJobResult, started=started, ray_init=ray_init)
    assert isinstance(result, CaptionJobResult)
    return result

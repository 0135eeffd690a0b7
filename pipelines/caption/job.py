"""The caption job, wired: config -> input plan -> stage specs -> streamed execution -> reconciliation.

    read (Ray read_*) -> normalize -> resume-filter -> decode (CPU tasks, autoscaled; to the model's input size)
        -> caption (fixed actor pool, `num_gpus` each) -> write (tasks: one file + checkpoint per batch)

The run skeleton (resume, progress, reconciliation, `_summary.json`) is `core.runner`. Expects Ray to be
initialised by the caller or by `ray_init`; this module configures no logging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..core import stop
from ..core.incremental import IncrementalJob, IncrementalResult, run_incremental
from ..core.lease import Lease
from ..core.model_stage import CALLS_PER_ACTOR
from ..core.output import OutputStore, WriteStage
from ..core.output.card import CardLayout, write_job_card
from ..core.runner import JobResult, Resources, checked_job, run_job
from ..core.stage import KeyFilter, StageSpec, apply_stages
from . import schema as S
from .config import CaptionJobConfig
from .decode import DecodeStage
from .readers import PARQUET_EXTENSIONS, InputPlan, normalize_stage, plan_input, read_dataset
from .report import write_caption_report
from .stage import CaptionStage
from .webdataset import SHARD_EXTENSIONS

logger = logging.getLogger(__name__)


@dataclass
class CaptionJobResult(JobResult):
    job = "caption"
    unit = "rows"
    report: str | None = None  # URI of `_report.html` (--report)

    def to_summary(self, config: Any) -> dict[str, Any]:
        return {**super().to_summary(config), "report": self.report}


def card_layout(keep_fields: list[pa.Field]) -> CardLayout:
    """The caption output's rows for the dataset card: Parquet columns / the `json` member, and the `txt` member."""
    return CardLayout(S.output_schema(keep_fields), members=(("txt", "string"),))


def caption_stages(plan: InputPlan, config: CaptionJobConfig, storage_options: dict[str, Any],
                   store: OutputStore, run: int, todo: pa.Array | None, resources: Resources,
                   model_stage: type[CaptionStage] = CaptionStage) -> list[StageSpec]:
    """The caption pipeline after the read. `todo`: only these keys (None: all)."""
    import ray

    batch = config.model_batch_size(resources.gpus_per_worker)
    specs = [StageSpec(normalize_stage(plan, config))]
    if todo is not None:
        # ship the smaller of the two sets; both select the same rows
        keep = len(todo) <= len(plan.keys) - len(todo)
        keys = todo if keep else pc.filter(plan.keys, pc.invert(pc.is_in(plan.keys, value_set=todo)))
        specs.append(StageSpec(KeyFilter(ray.put(keys), keep=keep)))
    # The decode tasks resize to the model's input size (the pixels the model would make, a fraction of the bytes),
    # except for an image safety checker, which must see the picture with its aspect ratio
    size = None if config.image_safety else model_stage.input_image_size(config.model, storage_options)
    specs += [
        # Small blocks are what spreads rows over decode tasks and caption actors: Ray hands an actor whole blocks,
        # and one Parquet file or shard can arrive as a single block of thousands of rows. max_calls=0 is Ray's
        # default for tasks (workers are reused); spelled out because differing remote args also keep Ray Data from
        # fusing decode into a CPU caption actor whose CPU request happens to be equal - decode must stay
        # autoscaled tasks running beside the actors, not inside them
        StageSpec(DecodeStage(config.max_image_side, config.max_image_pixels, plan.root.uri, storage_options,
                              size=size),
                  batch_size=config.decode_batch_size, num_cpus=resources.decode_cpus,
                  rows_per_block=config.decode_batch_size, ray_remote_args={"max_calls": 0}),
        # one call per block: Ray's per-call overhead is paid once per block, not once per model batch
        StageSpec(model_stage, batch_size=max(batch, config.decode_batch_size),
                  actors=resources.num_workers, num_gpus=resources.gpus_per_worker,
                  num_cpus=resources.cpus_per_worker, calls_per_actor=CALLS_PER_ACTOR, constructor_kwargs={
                      "model": config.model, "generation": config.generation_kwargs(),
                      "use_gpu": resources.gpus_per_worker > 0, "model_label": config.model,
                      "storage_options": storage_options, "cache_dir": config.model_cache_dir,
                      "model_batch_size": batch, "torch_threads": config.torch_threads,
                      "image_safety": config.image_safety, "compile": config.compile}),
        StageSpec(WriteStage(store, run, S.output_schema(plan.keep_fields)), batch_size=config.rows_per_file,
                  num_cpus=resources.write_cpus),
    ]
    return specs


def build_pipeline(plan: InputPlan, config: CaptionJobConfig, storage_options: dict[str, Any], store: OutputStore,
                   run: int, todo: pa.Array | None, resources: Resources,
                   model_stage: type[CaptionStage] = CaptionStage) -> Any:
    """The lazy Dataset from input to written-file stats."""
    specs = caption_stages(plan, config, storage_options, store, run, todo, resources, model_stage)
    return apply_stages(read_dataset(plan, config), specs)


def run_caption_unit(config: CaptionJobConfig, store: OutputStore, storage_options: dict[str, Any],
                     model_stage: type[CaptionStage] = CaptionStage, started: float | None = None,
                     ray_init: Callable[[], None] | None = None, plan: InputPlan | None = None
                     ) -> CaptionJobResult:
    """Plan `config.input` (InputError for a bad input; `plan`: planned already) and run the caption pipeline into
    `store`."""
    plan = plan or plan_input(config, storage_options)  # before touching the output: a bad input changes nothing

    def build(start: Any, resources: Resources) -> Any:
        return build_pipeline(plan, config, storage_options, store, start.run, start.only, resources, model_stage)

    def report(result: JobResult) -> None:
        if config.report:  # after the reconciliation: the sheet shows the whole output
            result.report = write_caption_report(store, plan, config, storage_options)  # type: ignore[attr-defined]

    result = run_job(config, store, plan.keys, build, CaptionJobResult, started=started, before_summary=report,
                     ray_init=ray_init, skipped_files=plan.skipped_files)
    assert isinstance(result, CaptionJobResult)
    return result


def run_caption_job(config: CaptionJobConfig, ray_init: Callable[[], None] | None = None,
                    model_stage: type[CaptionStage] = CaptionStage) -> CaptionJobResult | IncrementalResult:
    """Run (or resume) one caption job; returns its result - `succeeded` is False when reconciliation failed.
    Raises InputError / OutputConflictError / ClusterResourcesError / LeaseHeld / ValueError before any work for bad
    inputs, models or outputs, or an output another run holds. `ray_init`: starts Ray once those checks passed
    (default: the caller initialised it). `model_stage`: a subclass of CaptionStage to run instead (tests and
    benchmarks: stand-in models). With `config.incremental` the result is an `IncrementalResult`."""
    started = time.monotonic()
    storage_options, output = checked_job(config)
    if config.incremental:
        # the card's --keep-columns types come from the input files this run plans (Parquet inputs differ per file)
        layouts: list[CardLayout] = [] if config.keep_columns else [card_layout([])]

        def run_unit(unit_config: CaptionJobConfig, store: OutputStore) -> JobResult:
            plan = plan_input(unit_config, storage_options)
            layouts.append(card_layout(plan.keep_fields))
            return run_caption_unit(unit_config, store, storage_options, model_stage, plan=plan)

        job = IncrementalJob("caption", CaptionJobResult.unit,
                             SHARD_EXTENSIONS if config.input_format == "webdataset" else PARQUET_EXTENSIONS,
                             S.caption_members, run_unit)
        with Lease(output, config.lease_ttl_s, "caption") as lease:
            done = run_incremental(config, job, storage_options, ray_init, started, lease)
            write_job_card(config, output, "caption", layouts[-1] if layouts else None, done.run, done.succeeded)
            return done
    plan = plan_input(config, storage_options)  # refusals before the lease: a bad input changes nothing
    store = OutputStore(output, config.output_format, "caption", S.caption_members)
    with Lease(output, config.lease_ttl_s, "caption"), stop.interruptible():
        result = run_caption_unit(config, store, storage_options, model_stage, started, ray_init, plan)
        write_job_card(config, output, "caption", card_layout(plan.keep_fields), result.run, result.succeeded,
                       result.reconciliation.statuses)
        return result

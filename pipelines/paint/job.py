"""The paint job, wired: config -> prompt plan -> stage specs -> streamed execution -> reconciliation (+ report).

    plan_prompts (driver: parse + check every prompt file, before any work)
      -> ray.data.from_arrow(prompt table) -> expand (one row per (prompt key, image index), seed derived)
      -> resume-filter -> paint (fixed actor pool, `num_gpus` each) -> write (one data file + checkpoint per batch)

The run skeleton (resume, progress, reconciliation, `_summary.json`) is `core.runner`; seeds, keys and prompt
parsing are `paint.prompts`; the columns `paint.schema`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..core import columns as C
from ..core import stop
from ..core.incremental import IncrementalJob, IncrementalResult, run_incremental
from ..core.lease import Lease
from ..core.model_stage import CALLS_PER_ACTOR
from ..core.output import OutputStore, WriteStage
from ..core.output.card import CardLayout, write_job_card
from ..core.runner import JobResult, Resources, checked_job, run_job
from ..core.stage import KeyFilter, StageSpec, apply_stages
from .config import PaintJobConfig
from .prompts import FORMAT_OF_EXTENSION, ExpandStage, PromptPlan, plan_prompts
from .report import write_report
from .schema import BLOCKED, IMAGE_BYTES, output_schema, paint_members
from .stage import PaintStage

logger = logging.getLogger(__name__)


@dataclass
class PaintJobResult(JobResult):
    """Counts are per image key (one (prompt key, image index) pair); statuses ok / blocked / error."""

    job = "paint"
    unit = "images"
    report: str | None = None  # URI of `_report.html` (--report)
    blank_lines: int = 0  # blank lines of the .txt prompt files (no prompts)

    @property
    def input_images(self) -> int:
        return self.input_rows

    @property
    def blocked(self) -> int:
        """Blocked images of this run."""
        return self.statuses.get(BLOCKED, 0)

    @property
    def blocked_rows(self) -> int:
        """Blocked images in the whole output."""
        return self.reconciliation.statuses.get(BLOCKED, 0)

    def to_summary(self, config: Any) -> dict[str, Any]:
        return {**super().to_summary(config), "blocked_this_run": self.blocked, "blocked_rows": self.blocked_rows,
                "report": self.report, "blank_lines_skipped": self.blank_lines}


def card_layout(config: PaintJobConfig, keep: Sequence[pa.Field] = ()) -> CardLayout:
    """The paint output's rows for the dataset card: the image (a Parquet column / the `<png|jpg|webp>` member, both
    declared as images) and the metadata columns (the `json` member), --keep-columns included."""
    return CardLayout(output_schema(keep), members=((config.image_format, "image"),), image_column=IMAGE_BYTES)


def paint_stages(config: PaintJobConfig, storage_options: dict[str, Any], store: OutputStore, run: int,
                 todo: pa.Array | None, resources: Resources, model_stage: type[PaintStage] = PaintStage,
                 keep: Sequence[pa.Field] = ()) -> list[StageSpec]:
    """The paint pipeline after the prompt table. `todo`: only these image keys (None: all). `keep`: the prompt
    table's --keep-columns (the plan's `keep_fields`), written on every image row."""
    import ray

    batch = config.model_batch_size(resources.gpus_per_worker)
    specs = [StageSpec(ExpandStage(config.images_per_prompt, config.seed, config.negative_prompt),
                       num_cpus=resources.write_cpus)]
    if todo is not None:
        specs.append(StageSpec(KeyFilter(ray.put(todo), keep=True), num_cpus=resources.write_cpus))
    specs.append(StageSpec(
        model_stage, batch_size=batch, actors=resources.num_workers,
        num_gpus=resources.gpus_per_worker, num_cpus=resources.cpus_per_worker, calls_per_actor=CALLS_PER_ACTOR,
        # small blocks spread the rows over the actors (Ray hands an actor whole blocks)
        rows_per_block=batch,
        constructor_kwargs={
            "model": config.model, "sampling": config.sampling_kwargs(), "use_gpu": resources.gpus_per_worker > 0,
            "model_label": config.model, "image_format": config.image_format, "storage_options": storage_options,
            "cache_dir": config.model_cache_dir,
            "model_batch_size": 1 if config.bitwise_reproducible else batch,
            "torch_threads": config.torch_threads, "prompt_safety": config.prompt_safety,
            "image_safety": config.image_safety, "reranker": config.reranker, "rerank": config.rerank,
            "compile": config.compile}))
    specs.append(StageSpec(WriteStage(store, run, output_schema(keep)), batch_size=config.rows_per_file,
                           num_cpus=resources.write_cpus))
    return specs


def build_paint_pipeline(plan: PromptPlan, config: PaintJobConfig, storage_options: dict[str, Any],
                         store: OutputStore, run: int, todo: pa.Array | None, resources: Resources,
                         model_stage: type[PaintStage] = PaintStage) -> Any:
    """The lazy Dataset from the planned prompts to written-file stats."""
    import ray

    specs = paint_stages(config, storage_options, store, run, todo, resources, model_stage, plan.keep_fields)
    return apply_stages(ray.data.from_arrow(plan.prompts), specs)


def run_paint_unit(config: PaintJobConfig, store: OutputStore, storage_options: dict[str, Any],
                   model_stage: type[PaintStage] = PaintStage, started: float | None = None,
                   ray_init: Callable[[], None] | None = None, plan: PromptPlan | None = None) -> PaintJobResult:
    """Plan the prompts of `config.input` (InputError for a bad input; `plan`: planned already) and render them
    into `store`."""
    plan = plan or plan_prompts(config, storage_options)  # before touching the output: a bad input changes nothing

    def build(start: Any, resources: Resources) -> Any:
        return build_paint_pipeline(plan, config, storage_options, store, start.run, start.only, resources,
                                    model_stage)

    def report(result: JobResult) -> None:
        result.blank_lines = plan.blank_lines  # type: ignore[attr-defined]
        if config.report:
            result.report = write_report(store)  # type: ignore[attr-defined]

    # "blocked" is a final answer like "ok": --retry-errors renders only the "error" images again
    result = run_job(config, store, plan.image_keys(config.images_per_prompt), build, PaintJobResult,
                     final_statuses=(C.STATUS_OK, BLOCKED), started=started, before_summary=report,
                     ray_init=ray_init, skipped_files=plan.skipped_files)
    assert isinstance(result, PaintJobResult)
    return result


def run_paint_job(config: PaintJobConfig, ray_init: Callable[[], None] | None = None,
                  model_stage: type[PaintStage] = PaintStage) -> PaintJobResult | IncrementalResult:
    """Run (or resume) one paint job. Raises InputError / OutputConflictError / ClusterResourcesError / LeaseHeld /
    ValueError before any work for bad inputs, models or outputs, or an output another run holds; `succeeded` is
    False when reconciliation failed. `ray_init`: starts Ray once those checks passed (default: the caller
    initialised it). `model_stage`: a subclass of PaintStage to run instead (tests and benchmarks: stand-in models).
    With `config.incremental` the result is an `IncrementalResult`."""
    started = time.monotonic()
    storage_options, output = checked_job(config)
    if config.incremental:
        # --report is per staged file there: it would be deleted with the staging store
        unit_config = dataclasses.replace(config, report=False)
        # the card's --keep-columns types come from the prompt files this run plans
        layouts: list[CardLayout] = [] if config.keep_columns else [card_layout(config)]

        def run_unit(cfg: PaintJobConfig, store: OutputStore) -> JobResult:
            cfg = dataclasses.replace(cfg, report=False)
            plan = plan_prompts(cfg, storage_options)
            layouts.append(card_layout(config, plan.keep_fields))
            return run_paint_unit(cfg, store, storage_options, model_stage, plan=plan)

        job = IncrementalJob("paint", PaintJobResult.unit, tuple(FORMAT_OF_EXTENSION), paint_members, run_unit)
        with Lease(output, config.lease_ttl_s, "paint") as lease:
            done = run_incremental(unit_config, job, storage_options, ray_init, started, lease)
            write_job_card(config, output, "paint", layouts[-1] if layouts else None, done.run, done.succeeded)
            return done
    plan = plan_prompts(config, storage_options)  # refusals before the lease: a bad input changes nothing
    store = OutputStore(output, config.output_format, "paint", paint_members)
    with Lease(output, config.lease_ttl_s, "paint"), stop.interruptible():
        result = run_paint_unit(config, store, storage_options, model_stage, started, ray_init, plan)
        write_job_card(config, output, "paint", card_layout(config, plan.keep_fields), result.run, result.succeeded,
                       result.reconciliation.statuses)
        return result

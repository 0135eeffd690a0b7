"""The paint job (issue 6): prompt lists -> Paint actor pool -> images + metadata, exactly once.

DESIGN NOTE - what is reused from the caption pipeline, and what was generalised for it
=====================================================================================

    plan_prompts (driver: parse + check every prompt file, before any work)
      -> ray.data.from_arrow(prompt table) -> ExpandStage (one row per (prompt key, image index), seed derived)
      -> KeyFilter (resume) -> PaintStage (fixed actor pool, num_gpus each, num_cpus=0 for GPU actors)
      -> WriteStage(tar_members=paint_members) (tasks: one data file + checkpoint per batch)

Reused unchanged:
* `storage` - Location, locate, expand_input, AWS_* env -> s3fs options resolved once on the driver.
* `resume` - OutputStore (run numbers in `_job.json`, fingerprint check, `_checkpoint/` clean-up of interrupted
  writes, duplicate resolution for `--retry-errors`), `reconcile` (ids in the data files vs. ids of the input) and
  `_summary.json`. Its unit is the row `key` with a `status`; for paint the key is the IMAGE key
  `<prompt key>-<image index>`, so the (prompt key, image index) pairs are reconciled by the same code.
* `readers` - InputError, `_check_unique` (null/empty/duplicate keys), KeyFilter.
* `captioner` - `_ray_placement` (actor id + GPU ids); `models.fetch_model_folder` (s3:// model, once per node).
* `writers` - data file names (hash of sorted keys: a retried write rewrites the same file), atomic writes,
  checkpoints, `read_index`/`drop_keys` (format-generic: they read `key`/`status` from the json member), actor
  stats for the summary.
* `job.Resources.decide` / `_configure_data_context` - same resource rules (it only reads num_gpus_per_worker,
  cpus_per_worker, num_workers, no_progress_timeout_s, actor_start_timeout_s, which PaintJobConfig also has).
* `config._f` fields -> CLI flags / YAML / README table.

Generalised (small, backwards-compatible changes; caption behaviour and tests unchanged):
* `writers`: the WebDataset sample layout is a parameter (`tar_members`, default `caption_members` = txt + json);
  `WriteStage(..., tar_members=, requires=)` so another job declares its own output columns.
* `config`: `JobConfigMixin` (from_mapping / from_yaml / public_dict) shared by CaptionJobConfig and
  PaintJobConfig; `add_config_arguments`, `config_from_args`, `reference_markdown` take the config class.

Handled in the paint runner rather than generalised:
* `--retry-errors`: `job.run_caption_job` treats only status "ok" as done; paint also has "blocked" (a final answer),
  so `run_paint_job` re-renders only status "error".
* `resume.OutputStore(job_name=)` names the job in its messages.
Still caption-shaped (see pipelines/PAINT_PIPELINE_STATUS.md): `Reconciliation.ok_rows/error_rows` and the
`WriteStage` stats count "blocked" as error; the paint summary adds `blocked_rows`.

Seeds, keys and prompt parsing: `pipelines.prompts`. Output columns: `pipelines.paint_schema`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .config import JobConfigMixin, _f, flag
from .paint_schema import (
    BLOCKED,
    IMAGE_FORMATS,
    OUTPUT_SCHEMA,
    SCHEDULERS,
    WRITE_REQUIRES,
    paint_members,
)
from .prompts import ExpandStage, PromptPlan, plan_prompts
from .readers import KeyFilter
from .resume import OutputStore, Reconciliation, reconcile
from .storage import locate, resolve_storage_options
from .writers import WriteStage, merge_actor_stats

OUTPUT_FORMATS = ("webdataset", "parquet")


def parse_size(size: str | int | None) -> tuple[int | None, int | None]:
    """`--size`: `512` (square) or `768x512` (WIDTHxHEIGHT); None/""/0: the model's native size."""
    if size in (None, "", 0, "0"):
        return None, None
    text = str(size).lower().strip()
    try:
        if "x" in text:
            w, h = text.split("x", 1)
            return int(w), int(h)
        return int(text), int(text)
    except ValueError as exc:
        raise ValueError(f"--size must be N or WIDTHxHEIGHT, got {size!r}") from exc


@dataclass
class PaintJobConfig(JobConfigMixin):
    """Everything `jobs/paint.py` needs. Field names are the flags (`prompt_column` -> `--prompt-column`)."""

    # ---- input ------------------------------------------------------------------------------------------------
    input: str = _f("", "Local path or s3:// URI of a prompt file (.txt/.jsonl/.csv/.parquet), a folder or a prefix.",
                    group="input", fingerprint=True)
    prompt_column: str = _f("prompt", "Column holding the prompt (jsonl/csv/parquet). Optional columns: key, "
                            "negative_prompt, seed.", group="input", fingerprint=True)
    storage_options: dict[str, Any] = _f({}, "JSON object of s3fs options; overrides the AWS_* environment "
                                         "variables. Never written to the output.", group="input", secret=True)

    # ---- output -----------------------------------------------------------------------------------------------
    output: str = _f("", "Local path or s3:// URI of the output folder/prefix.", group="output")
    output_format: str = _f("webdataset", "webdataset: tar shards, per image `<key>.<png|jpg|webp>` + `<key>.json`; "
                            "parquet: one row per image with the image bytes in `image`.", choices=OUTPUT_FORMATS,
                            group="output", fingerprint=True)
    image_format: str = _f("png", "Encoding of the images.", choices=IMAGE_FORMATS, group="output",
                           fingerprint=True)
    rows_per_file: int = _f(256, "Images per output file (the unit of resume).", group="output")
    retry_errors: bool = _f(False, "Render again only the images whose latest status is `error`.", group="output")
    overwrite: bool = _f(False, "Delete this job's files from --output first.", group="output")
    report: bool = _f(False, "Write `_report.html` (a contact sheet of the first images) under --output.",
                      group="output")

    # ---- model ------------------------------------------------------------------------------------------------
    model: str = _f("tiny", "`tiny` (random weights), a local model folder, or an s3:// prefix.", group="model",
                    fingerprint=True)
    model_cache_dir: str | None = _f(None, "Where s3:// models are downloaded on each node.", group="model")
    images_per_prompt: int = _f(1, "Images per prompt.", group="model", fingerprint=True)
    steps: int = _f(50, "Denoising steps.", group="model", fingerprint=True)
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale.", group="model", fingerprint=True)
    size: str | None = _f(None, "Image size: N (square) or WIDTHxHEIGHT, multiples of 8 (default: the model's).",
                          group="model", fingerprint=True)
    scheduler: str = _f("ddpm", "ddpm (the original) or dpmsolver (DPM-Solver++, fewer steps).",
                        choices=SCHEDULERS, group="model", fingerprint=True)
    seed: int = _f(0, "Base seed: images without a `seed` column value get a seed derived from (seed, prompt key, "
                   "image index).", group="model", fingerprint=True)
    negative_prompt: str | None = _f(None, "Negative prompt for rows without a `negative_prompt` value.",
                                     group="model", fingerprint=True)
    prompt_safety: str | None = _f(None, "Local folder of the prompt safety checker (off by default).",
                                   group="model", fingerprint=True)
    image_safety: str | None = _f(None, "Local folder of the image safety checker (off by default).",
                                  group="model", fingerprint=True)
    rerank: str | None = _f(None, "Local folder of the CLIP reranker (off by default).", group="model",
                            fingerprint=True)

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int = _f(4, "Images per model call.", group="resources")
    num_workers: int = _f(1, "Paint actors (model replicas).", group="resources")
    num_gpus_per_worker: float | None = _f(None, "GPUs per paint actor (default: 1 where the cluster has GPUs, "
                                           "else 0).", group="resources")
    cpus_per_worker: float | None = _f(None, "CPUs reserved per paint actor (default: 0 for GPU actors).",
                                       group="resources")
    torch_threads: int | None = _f(None, "CPU paint actors: torch threads each.", group="resources")
    actor_start_timeout_s: float = _f(1800.0, "Fail if the paint actors are not up after this long.",
                                      group="resources")
    no_progress_timeout_s: float = _f(1800.0, "Fail if the pipeline makes no progress for this long.",
                                      group="resources")
    progress_every_s: float = _f(30.0, "Seconds between progress log lines.", group="resources")

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):
            from .config import parse_json_object

            self.storage_options = parse_json_object(self.storage_options, "storage_options")
        if isinstance(self.size, int):
            self.size = str(self.size)

    def validate(self) -> "PaintJobConfig":
        problems: list[str] = []
        if not self.input:
            problems.append("--input is required")
        if not self.output:
            problems.append("--output is required")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.append(f"--{flag(f.name)} must be one of {list(choices)}, got {value!r}")
        for name in ("batch_size", "num_workers", "rows_per_file", "images_per_prompt", "steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 63:
            problems.append(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            problems.append(f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}")
        try:
            self.sampling_kwargs()
        except ValueError as exc:
            problems.append(f"sampling settings: {exc}")
        if problems:
            raise ValueError("invalid paint job config:\n  - " + "\n  - ".join(problems))
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `viscpm.SamplingConfig` (checked by it)."""
        width, height = parse_size(self.size)
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": float(self.guidance_scale),
                  "height": height, "width": width,
                  "scheduler": "dpmsolver++" if self.scheduler == "dpmsolver" else self.scheduler}
        from viscpm import SamplingConfig  # local: keeps this module light

        SamplingConfig(**kwargs)
        return kwargs

    def fingerprint(self) -> dict[str, Any]:
        fp = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("fingerprint")}
        fp["sampling"] = self.sampling_kwargs()
        fp["job"] = "paint"  # a caption job's output is never resumed as a paint job's
        return fp


# ==== the runner ======================================================================================================
logger = logging.getLogger(__name__)
REPORT_FILE = "_report.html"
REPORT_IMAGES = 48


@dataclass
class PaintJobResult:
    output: str
    run: int
    input_images: int  # (prompt key, image index) pairs in the input
    skipped: int
    processed: int
    ok: int
    error: int  # this run: error + blocked (the write stats count status != ok)
    elapsed_s: float
    pipeline_s: float
    reconciliation: Reconciliation
    blocked_rows: int = 0  # in the whole output
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    files_written: int = 0
    report: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.reconciliation.ok

    @property
    def images_per_s(self) -> float:
        return self.processed / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def one_line(self) -> str:
        r = self.reconciliation
        head = "paint job done" if self.succeeded else "paint job FAILED reconciliation"
        return (f"{head}: {self.processed} images this run ({self.ok} ok, {self.error} blocked/error), "
                f"{self.skipped} already done; output {r.output_rows}/{r.input_rows} image keys ({r.ok_rows} ok, "
                f"{self.blocked_rows} blocked, {r.error_rows - self.blocked_rows} error); {self.elapsed_s:.1f} s, "
                f"{self.images_per_s:.2f} images/s -> {self.output}")

    def to_summary(self, config: PaintJobConfig) -> dict[str, Any]:
        return {"succeeded": self.succeeded, "run": self.run, "output": self.output,
                "input_images": self.input_images, "skipped_already_done": self.skipped,
                "processed_this_run": self.processed, "ok_this_run": self.ok,
                "blocked_or_error_this_run": self.error, "blocked_rows": self.blocked_rows,
                "files_written_this_run": self.files_written, "elapsed_s": round(self.elapsed_s, 3),
                "pipeline_s": round(self.pipeline_s, 3), "images_per_s": round(self.images_per_s, 3),
                "reconciliation": self.reconciliation.to_dict(), "problems": self.reconciliation.problems(),
                "actors": self.actors, "report": self.report, "config": config.public_dict()}


def build_paint_pipeline(plan: PromptPlan, config: PaintJobConfig, storage_options: dict[str, Any],
                         store: OutputStore, run: int, todo: pa.Array | None, resources: Any) -> Any:
    """The lazy Dataset from the planned prompts to written-file stats. `todo`: only these image keys."""
    import ray
    from ray.data import ActorPoolStrategy

    from .painter import PaintStage

    ds = ray.data.from_arrow(plan.prompts)
    ds = ds.map_batches(ExpandStage(config.images_per_prompt, config.seed, config.negative_prompt),
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if todo is not None:
        ds = ds.map_batches(KeyFilter(ray.put(todo), keep=True), batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25)
    # small blocks spread the rows over the actors (Ray hands an actor whole blocks)
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        PaintStage, fn_constructor_kwargs={
            "model": config.model, "sampling": config.sampling_kwargs(), "use_gpu": resources.gpus_per_worker > 0,
            "model_label": config.model, "image_format": config.image_format, "storage_options": storage_options,
            "cache_dir": config.model_cache_dir, "model_batch_size": config.batch_size,
            "torch_threads": config.torch_threads, "prompt_safety": config.prompt_safety,
            "image_safety": config.image_safety, "rerank": config.rerank},
        batch_format="pyarrow", batch_size=config.batch_size, compute=ActorPoolStrategy(size=resources.num_workers),
        num_gpus=resources.gpus_per_worker or None, num_cpus=resources.cpus_per_worker)
    return ds.map_batches(WriteStage(store.location, run, config.output_format, OUTPUT_SCHEMA,
                                     tar_members=paint_members, requires=WRITE_REQUIRES),
                          batch_format="pyarrow", batch_size=config.rows_per_file, num_cpus=0.25)


def run_paint_job(config: PaintJobConfig) -> PaintJobResult:
    """Run (or resume) one paint job (Ray initialised by the caller). Raises InputError / OutputConflictError /
    ValueError before any work for bad inputs or outputs; `succeeded` is False when reconciliation failed."""
    import ray

    from .job import Resources, _configure_data_context

    started = time.monotonic()
    config.validate()
    storage_options = resolve_storage_options(config.storage_options)
    plan = plan_prompts(config, storage_options)
    keys = plan.image_keys(config.images_per_prompt)
    store = OutputStore(locate(config.output, storage_options), config.output_format, job_name="paint")
    run = store.start_run(config.fingerprint(), "retry-errors" if config.retry_errors else "normal",
                          overwrite=config.overwrite)
    store.clean_incomplete()
    store.resolve_duplicates(run)

    state = store.checkpoint_index()
    # "blocked" is a final answer like "ok": only "error" rows are rendered again by --retry-errors
    done = state if not config.retry_errors else state.filter(pc.not_equal(state[S.STATUS], S.STATUS_ERROR))
    todo = pc.filter(keys, pc.invert(pc.is_in(keys, value_set=done[S.KEY]))) if done.num_rows else keys
    skipped = len(keys) - len(todo)
    logger.info("run %d: %d images in the input, %d already done, %d to render", run, len(keys), skipped, len(todo))

    processed = ok = error = files = 0
    actors: dict[str, dict[str, Any]] = {}
    pipeline_started = time.monotonic()
    if len(todo):
        _configure_data_context(config)  # type: ignore[arg-type]
        resources = Resources.decide(config, ray.cluster_resources())  # type: ignore[arg-type]
        ds = build_paint_pipeline(plan, config, storage_options, store, run, None if skipped == 0 else todo,
                                  resources)
        last_log = time.monotonic()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for row in batch.to_pylist():
                processed += row["rows"]
                ok += row["ok"]
                error += row["error"]
                files += 1
                merge_actor_stats(actors, json.loads(row["actors"]))
            if time.monotonic() - last_log >= config.progress_every_s:
                last_log = time.monotonic()
                logger.info("progress: %d/%d images (%d ok)", processed, len(todo), ok)
    pipeline_s = time.monotonic() - pipeline_started

    store.resolve_duplicates(run)
    index = store.data_index()
    recon = reconcile(keys, index)
    blocked = int(pc.sum(pc.equal(index[S.STATUS], BLOCKED)).as_py() or 0) if index.num_rows else 0
    result = PaintJobResult(output=store.location.uri, run=run, input_images=len(keys), skipped=skipped,
                            processed=processed, ok=ok, error=error, elapsed_s=time.monotonic() - started,
                            pipeline_s=pipeline_s, reconciliation=recon, blocked_rows=blocked, actors=actors,
                            files_written=files)
    for problem in recon.problems():
        logger.error("reconciliation: %s", problem)
    if config.report:
        result.report = write_report(store)
    store.finish_run(run, result.succeeded, result.to_summary(config))
    return result


# ==== --report: contact sheet =========================================================================================
def _report_rows(store: OutputStore, limit: int) -> list[tuple[dict[str, Any], bytes | None]]:
    """(metadata, image bytes) of the first `limit` rows, in key order of the data files (sorted by name)."""
    rows: list[tuple[dict[str, Any], bytes | None]] = []
    for name in store.data_files():
        data = store.location.child(name).read_bytes()
        if store.output_format == "parquet":
            for row in pq.read_table(io.BytesIO(data)).to_pylist():
                image = row.pop("image", None)
                rows.append((row, image))
        else:
            samples: dict[str, dict[str, Any]] = {}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    stem, _, suffix = info.name.rpartition(".")
                    content = tar.extractfile(info).read()
                    sample = samples.setdefault(stem, {})
                    if suffix == "json":
                        sample["meta"] = json.loads(content.decode("utf-8"))
                    else:
                        sample["image"] = content
            rows += [(s.get("meta", {}), s.get("image")) for s in samples.values()]
        if len(rows) >= limit:
            break
    rows.sort(key=lambda r: str(r[0].get(S.KEY)))
    return rows[:limit]


def _thumbnail(image: bytes, side: int = 256) -> str:
    from PIL import Image

    im = Image.open(io.BytesIO(image)).convert("RGB")
    im.thumbnail((side, side))
    sink = io.BytesIO()
    im.save(sink, "PNG")
    return "data:image/png;base64," + base64.b64encode(sink.getvalue()).decode("ascii")


def render_report(rows: list[tuple[dict[str, Any], bytes | None]], title: str) -> str:
    """A self-contained HTML contact sheet: embedded thumbnails, prompt (escaped, shortened), key, seed, status."""
    cells = []
    for meta, image in rows:
        prompt = str(meta.get("prompt") or "")
        shown = prompt if len(prompt) <= 300 else prompt[:300] + f"... ({len(prompt)} chars)"
        picture = (f'<img src="{_thumbnail(image)}" alt="{html.escape(str(meta.get(S.KEY)))}">' if image else
                   f'<div class="none">{html.escape(str(meta.get(S.STATUS)))}</div>')
        note = meta.get(S.ERROR) or ""
        cells.append(
            f'<figure>{picture}<figcaption><b>{html.escape(str(meta.get(S.KEY)))}</b> seed '
            f'{html.escape(str(meta.get("seed")))} [{html.escape(str(meta.get(S.STATUS)))}]<br>'
            f'<span class="p">{html.escape(shown)}</span>'
            f'{"<br><i>" + html.escape(note) + "</i>" if note else ""}</figcaption></figure>')
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif}figure{display:inline-block;width:260px;vertical-align:top;margin:6px}"
            "img{width:256px}.none{width:256px;height:256px;background:#ddd;display:flex;align-items:center;"
            "justify-content:center}.p{white-space:pre-wrap;word-break:break-all;font-size:12px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "".join(cells) + "</body></html>")


def write_report(store: OutputStore, limit: int = REPORT_IMAGES) -> str:
    """Write `_report.html` under the output; returns its URI."""
    text = render_report(_report_rows(store, limit), f"paint run {store.location.uri}")
    target = store.location.child(REPORT_FILE)
    target.write_bytes_atomic(text.encode("utf-8"))
    return target.uri

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
* `actors` - ModelStage (GPU/CPU placement, row-isolating model calls, bookkeeping columns);
  `models.fetch_model_folder` (s3:// model, once per node).
* `writers` - data file names (hash of sorted keys: a retried write rewrites the same file), atomic writes,
  checkpoints, `read_index`/`drop_keys` (format-generic: they read `key`/`status` from the json member), actor
  stats for the summary.
* `runner` - the run skeleton both jobs use: `open_run` (what is left), `execute` (stream the stats rows, progress),
  reconciliation + `_summary.json`, `Resources.decide` (same resource rules), `JobResult` (counts by status).
* `config._f` fields -> CLI flags / YAML / README table; `jobs/jobcli.py` -> the command line.

Generalised (small, backwards-compatible changes; caption behaviour and tests unchanged):
* `writers`: the WebDataset sample layout is a parameter (`tar_members`, default `caption_members` = txt + json);
  `WriteStage(..., tar_members=, requires=)` so another job declares its own output columns; its stats and
  `Reconciliation` count rows by status, so "blocked" is neither ok nor error.
* `config`: `JobConfigMixin` (from_mapping / from_yaml / public_dict / shared checks) for both configs;
  `add_config_arguments`, `config_from_args`, `reference_markdown` take the config class.
* `--retry-errors`: `runner.open_run(final_statuses=)`; for paint "blocked" is a final answer like "ok", so only
  status "error" is rendered again.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import schema as S
from .config import JobConfigMixin, _f
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
from .models import check_model_folders
from .resume import OutputStore
from .runner import JobResult, Resources, RunStart, run_job
from .storage import locate, resolve_storage_options
from .writers import WriteStage

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
    size: str | int | None = _f(None, "Image size: N (square) or WIDTHxHEIGHT, multiples of 8 (default: the model's, "
                          "512 for VisCPM-Paint, 64 for tiny).",
                          group="model", fingerprint=True)
    scheduler: str = _f("ddpm", "ddpm (the original) or dpmsolver (DPM-Solver++, fewer steps).",
                        choices=SCHEDULERS, group="model", fingerprint=True)
    seed: int = _f(0, "Base seed: images without a `seed` column value get a seed derived from (seed, prompt key, "
                   "image index).", group="model", fingerprint=True)
    negative_prompt: str | None = _f(None, "Negative prompt for rows without a `negative_prompt` value.",
                                     group="model", fingerprint=True)
    prompt_safety: str | None = _f(None, "Folder (local or s3://) of the prompt safety checker (a BERT "
                                   "classifier): a flagged prompt's images get status `blocked` and no image. Off "
                                   "by default.",
                                   group="model", fingerprint=True)
    image_safety: str | None = _f(None, "Folder (local or s3://) of the image safety checker (SD safety checker "
                                  "+ CLIP image processor): flagged images are blacked out, `nsfw` true. Off by "
                                  "default.",
                                  group="model", fingerprint=True)
    rerank: int = _f(0, "Best-of-N: draw N candidates per image and keep the one the Chinese-CLIP reranker "
                     "(--reranker) scores highest; 0: off.", group="model", fingerprint=True)
    reranker: str | None = _f(None, "Folder (local or s3://) of the Chinese-CLIP reranker (needed by --rerank).",
                              group="model", fingerprint=True)

    # ---- resources --------------------------------------------------------------------------------------------
    batch_size: int = _f(4, "Images per model call (UNet batch: twice as many rows with guidance).",
                         group="resources")
    bitwise_reproducible: bool = _f(False, "Render each image in its own model call (the actor still takes "
                                    "--batch-size rows at a time), so its bytes never depend on --batch-size, "
                                    "--num-workers or a resume; slower on GPU. Without it, the same command on the "
                                    "same hardware gives the same bytes, but a batched UNet call can move a pixel "
                                    "by 1 when the batch changes.", group="resources")
    num_workers: int = _f(1, "Paint actors (model replicas).", group="resources")
    num_gpus_per_worker: float | None = _f(None, "GPUs per paint actor (default: 1 where the cluster has GPUs, "
                                           "else 0).", group="resources")
    cpus_per_worker: float | None = _f(None, "CPUs reserved per paint actor (default: 0 for GPU actors).",
                                       group="resources")
    torch_threads: int | None = _f(None, "CPU paint actors: torch threads each.", group="resources")
    actor_start_timeout_s: float | None = _f(None, "Fail (exit 1, with a message) if the paint actors are not up "
                                             "after this long. Default: 1800 s when the cluster has the resources "
                                             "they ask for (model download + load), 600 s when it must wait for "
                                             "nodes to join (an autoscaling cluster).", group="resources")
    no_progress_timeout_s: float = _f(1800.0, "Fail if the pipeline makes no progress for this long.",
                                      group="resources")
    progress_every_s: float = _f(30.0, "Seconds between progress log lines.", group="resources")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.size, int):
            self.size = str(self.size)

    def model_sources(self) -> list[tuple[str, str | None, str]]:
        """(flag, value, folder kind) of every model folder the actors will load (checked on the driver first)."""
        return [("--model", self.model, "paint"), ("--prompt-safety", self.prompt_safety, "component"),
                ("--image-safety", self.image_safety, "image-safety"),
                ("--reranker", self.reranker if self.rerank else None, "component")]

    def validate(self) -> "PaintJobConfig":
        """Check values that do not need any I/O; raise ValueError naming every problem found."""
        problems = self.common_problems(("batch_size", "num_workers", "rows_per_file", "images_per_prompt", "steps"))
        if self.rerank < 0:
            problems.append(f"--rerank must be >= 0, got {self.rerank}")
        if self.rerank and not self.reranker:
            problems.append("--rerank needs --reranker FOLDER (the Chinese-CLIP reranker)")
        if self.reranker and not self.rerank:
            problems.append("--reranker needs --rerank N, the candidates per image (the original drew 4)")
        if not 0 <= self.seed < 2 ** 63:
            problems.append(f"--seed must be in [0, 2**63), got {self.seed}")
        try:
            self.sampling_kwargs()
        except ValueError as exc:
            problems.append(f"sampling settings: {exc}")
        self.raise_problems(problems, "paint")
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
        fp = self.fingerprint_fields()
        fp["sampling"] = self.sampling_kwargs()
        fp["job"] = "paint"  # a caption job's output is never resumed as a paint job's
        return fp


# ==== the runner ======================================================================================================
logger = logging.getLogger(__name__)
REPORT_FILE = "_report.html"
REPORT_IMAGES = 48


@dataclass
class PaintJobResult(JobResult):
    """Counts are per image key (one (prompt key, image index) pair); statuses ok / blocked / error."""

    job = "paint"
    unit = "images"
    report: str | None = None  # URI of `_report.html` (--report)

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
                "report": self.report}


def build_paint_pipeline(plan: PromptPlan, config: PaintJobConfig, storage_options: dict[str, Any],
                         store: OutputStore, run: int, todo: pa.Array | None, resources: Any) -> Any:
    """The lazy Dataset from the planned prompts to written-file stats. `todo`: only these image keys."""
    import ray
    from ray.data import ActorPoolStrategy

    from .painter import PaintStage

    ds = ray.data.from_arrow(plan.prompts)
    ds = ds.map_batches(ExpandStage(config.images_per_prompt, config.seed, config.negative_prompt),
                        batch_format="pyarrow", batch_size=None, num_cpus=resources.write_cpus)
    if todo is not None:
        ds = ds.map_batches(KeyFilter(ray.put(todo), keep=True), batch_format="pyarrow", batch_size=None,
                            num_cpus=resources.write_cpus)
    # small blocks spread the rows over the actors (Ray hands an actor whole blocks)
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        PaintStage, fn_constructor_kwargs={
            "model": config.model, "sampling": config.sampling_kwargs(), "use_gpu": resources.gpus_per_worker > 0,
            "model_label": config.model, "image_format": config.image_format, "storage_options": storage_options,
            "cache_dir": config.model_cache_dir,
            "model_batch_size": 1 if config.bitwise_reproducible else config.batch_size,
            "torch_threads": config.torch_threads, "prompt_safety": config.prompt_safety,
            "image_safety": config.image_safety, "reranker": config.reranker,
            "rerank": config.rerank},
        batch_format="pyarrow", batch_size=config.batch_size, compute=ActorPoolStrategy(size=resources.num_workers),
        num_gpus=resources.gpus_per_worker or None, num_cpus=resources.cpus_per_worker)
    return ds.map_batches(WriteStage(store.location, run, config.output_format, OUTPUT_SCHEMA,
                                     tar_members=paint_members, requires=WRITE_REQUIRES),
                          batch_format="pyarrow", batch_size=config.rows_per_file, num_cpus=resources.write_cpus)


def run_paint_job(config: PaintJobConfig, ray_init: Callable[[], None] | None = None) -> PaintJobResult:
    """Run (or resume) one paint job. Raises InputError / OutputConflictError / ClusterResourcesError / ValueError
    before any work for bad inputs, models or outputs; `succeeded` is False when reconciliation failed.
    `ray_init`: starts Ray once those checks passed (default: the caller initialised it)."""
    started = time.monotonic()
    config.validate()
    storage_options = resolve_storage_options(config.storage_options)
    check_model_folders(config.model_sources(), storage_options)
    plan = plan_prompts(config, storage_options)  # before touching the output: a bad input changes nothing
    store = OutputStore(locate(config.output, storage_options), config.output_format, job_name="paint")

    def build(start: RunStart, resources: Resources) -> Any:
        return build_paint_pipeline(plan, config, storage_options, store, start.run, start.only, resources)

    def report(result: JobResult) -> None:
        if config.report:
            result.report = write_report(store)  # type: ignore[attr-defined]

    # "blocked" is a final answer like "ok": --retry-errors renders only the "error" images again
    result = run_job(config, store, plan.image_keys(config.images_per_prompt), build, PaintJobResult,
                     final_statuses=(S.STATUS_OK, BLOCKED), started=started, before_summary=report,
                     ray_init=ray_init)
    assert isinstance(result, PaintJobResult)
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

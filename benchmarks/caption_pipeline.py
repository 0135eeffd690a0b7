"""Caption pipeline benchmark: prints measured numbers from one machine.

1. throughput - images/s of the whole job (local Ray, decode tasks + caption actor) against a bare Python loop over
   the same images and model (decode + caption, no Ray). Goal: within 3% at 2,000+ images.
2. busy share - with a stand-in model that sleeps a fixed time per batch (an emulated accelerator at ~100 images/s,
   `testing/standins.py`), the share of wall time the caption actor spends inside the model. Goal: >= 97%.
3. memory - peak memory of the driver + every Ray process for 10k vs 100k input rows (stand-in model, small
   images). Goal: <= 1.1x, i.e. the job streams and never materialises the dataset.

Every measurement runs in a fresh subprocess (its own local Ray), so one cannot warm up or pollute another.
BENCH_DEBUG_MEMORY=1 adds each process's peak private memory to the memory step's raw result.

    python benchmarks/caption_pipeline.py                     # all three, default sizes
    python benchmarks/caption_pipeline.py --only throughput --images 2000 --num-cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


# ---- measurements (each runs in its own subprocess) ----------------------------------------------------------------
def make_input(folder: Path, rows: int, size: tuple[int, int], rows_per_file: int = 1000) -> Path:
    """A folder of Parquet files of `rows_per_file` rows each: more rows means more files of the same size, as in
    a real corpus - so a read task's memory (one file) stays the same and only dataset-wide growth shows."""
    import pyarrow.parquet as pq

    from testing.synthetic import synthetic_images_table

    path = folder / f"input-{rows}-{size[0]}x{size[1]}"
    if not (path / "_done").exists():
        path.mkdir(parents=True, exist_ok=True)
        for start in range(0, rows, rows_per_file):
            table = synthetic_images_table(min(rows_per_file, rows - start), size=size, seed=start,
                                           id_prefix=f"r{start}-")
            pq.write_table(table, path / f"part-{start // rows_per_file:05d}.parquet", row_group_size=1000)
        (path / "_done").write_text("ok")
    return path


class MemorySampler:
    """Peak of the summed RSS / PSS of this process and all its descendants (the local Ray it started)."""

    def __init__(self, every_s: float = 0.25) -> None:
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.peak_rss = self.peak_pss = self.peak_uss = self.peak_procs = 0
        self.per_proc: dict[str, int] = {}
        self.series: list[tuple[float, int, int]] = []  # (seconds, summed USS MB, processes)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self.psutil.Process()
        rss = pss = uss = 0
        procs = [me, *me.children(recursive=True)]
        for proc in procs:
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                uss += getattr(info, "uss", info.rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_uss, self.peak_procs = max(self.peak_uss, uss), max(self.peak_procs, len(procs))
        self.series.append((round(time.monotonic() - self.started, 1), round(uss / 2**20), len(procs)))
        if os.environ.get("BENCH_DEBUG_MEMORY"):
            for proc in procs:
                try:
                    name = f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[-40:]}"
                    self.per_proc[name] = max(self.per_proc.get(name, 0), proc.memory_full_info().uss)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_job(args: argparse.Namespace, input_path: Path, model: str, out: Path, memory: bool = False,
            standin_seconds: float | None = None) -> dict:
    """`standin_seconds`: run the sleeping stand-in model (that many seconds per model call) instead of `model`."""
    import ray

    from pipelines import CaptionJobConfig, run_caption_job
    from pipelines.caption.stage import CaptionStage
    from testing.standins import sleeping_caption_stage

    stage = CaptionStage if standin_seconds is None else sleeping_caption_stage(standin_seconds)
    if args.calls_per_actor is not None:  # batches in flight per caption actor (the job's default: 2)
        import pipelines.caption.job

        pipelines.caption.job.CALLS_PER_ACTOR = args.calls_per_actor

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=args.object_store_mb << 20)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    config = CaptionJobConfig(input=str(input_path), output=str(out), model=model, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, num_gpus_per_worker=0, overwrite=True,
                              progress_every_s=1e9, cpus_per_worker=args.cpus_per_worker,
                              **({"decode_batch_size": args.decode_batch_size} if args.decode_batch_size else {}))
    sampler = MemorySampler() if memory else None
    started = time.monotonic()
    if sampler:
        with sampler:
            result = run_caption_job(config, model_stage=stage)
    else:
        result = run_caption_job(config, model_stage=stage)
    wall = time.monotonic() - started
    actors = list(result.actors.values())
    first = min(a["first_start"] for a in actors)
    last = max(a["last_end"] for a in actors)
    model_s = sum(a["model_s"] for a in actors)
    out_stats = {
        "rows": result.processed, "succeeded": result.succeeded, "wall_s": wall, "pipeline_s": result.pipeline_s,
        "images_per_s_wall": result.processed / wall, "images_per_s_pipeline": result.images_per_s,
        "steady_s": last - first, "images_per_s_steady": result.processed / (last - first),
        "model_s": model_s, "busy_share_steady": model_s / (len(actors) * (last - first)),
        "busy_share_pipeline": model_s / (len(actors) * result.pipeline_s), "actors": len(actors),
    }
    if sampler:
        second_half = sorted(uss for t, uss, _ in sampler.series if t >= wall / 2) or [0]
        out_stats["steady_uss_mb"] = second_half[len(second_half) // 2]  # median over the second half of the run
        out_stats.update(peak_rss_mb=sampler.peak_rss / 2**20, peak_pss_mb=sampler.peak_pss / 2**20,
                         peak_uss_mb=sampler.peak_uss / 2**20, peak_processes=sampler.peak_procs)
        out_stats["uss_series"] = sampler.series[:: max(1, len(sampler.series) // 40)]
        if os.environ.get("BENCH_DEBUG_MEMORY"):
            out_stats["per_process_uss_mb"] = {k: round(v / 2**20) for k, v in sorted(
                sampler.per_proc.items(), key=lambda kv: -kv[1])}
    ray.shutdown()
    return out_stats


def run_bare_loop(args: argparse.Namespace, input_path: Path) -> dict:
    """The same images and model without Ray: read, decode, caption in batches, in one process."""
    import pyarrow.parquet as pq

    from pipelines.caption.config import CaptionJobConfig
    from pipelines.caption.decode import decode_image
    from pipelines.caption.stage import load_caption_model
    from viscpm import GenerationConfig

    config = CaptionJobConfig(input="-", output="-", max_new_tokens=args.max_new_tokens)
    generation = GenerationConfig(**config.generation_kwargs())
    model = load_caption_model(args.model, device="cpu")
    if args.child == "bare1":
        import torch

        torch.set_num_threads(1)  # what a Ray actor gets by default (OMP_NUM_THREADS=1)
    started = time.monotonic()
    rows = 0
    for file in sorted(input_path.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=args.batch_size, columns=["id", "image"]):
            images = [decode_image(b, config.max_image_side) for b in batch.column("image").to_pylist()]
            results = model.generate(images, [config.question] * len(images), generation=generation)
            rows += len(results)
    wall = time.monotonic() - started
    return {"rows": rows, "wall_s": wall, "images_per_s": rows / wall}


def child_main(argv: list[str]) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    if args.child in ("bare", "bare1"):
        result = run_bare_loop(args, make_input(work, args.images, (256, 192)))
    elif args.child == "job":
        result = run_job(args, make_input(work, args.images, (256, 192)), args.model, work / "out-job")
    elif args.child == "busy":
        result = run_job(args, make_input(work, args.busy_images, (256, 192)), "tiny", work / "out-busy",
                         standin_seconds=args.batch_size / 100)
    else:  # memory:<rows>
        rows = int(args.child.split(":")[1])
        result = run_job(args, make_input(work, rows, (64, 48)), "tiny", work / f"out-mem-{rows}", memory=True,
                         standin_seconds=0)
    print("RESULT " + json.dumps(result), flush=True)


# ---- orchestration ---------------------------------------------------------------------------------------------------
def run_child(kind: str, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--child", kind]
    proc = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark step {kind} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-5000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["throughput", "busy", "memory"], action="append")
    parser.add_argument("--images", type=int, default=2000, help="throughput: images")
    parser.add_argument("--busy-images", type=int, default=3000, help="busy share: images")
    parser.add_argument("--memory-rows", default="10000,100000", help="memory: the two input sizes")
    parser.add_argument("--model", default="tiny", help="throughput: model for job and bare loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--decode-batch-size", type=int, default=None, help="default: the job's default")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: the job's default")
    parser.add_argument("--calls-per-actor", type=int, default=None,
                        help="batches in flight per caption actor (default: the job's, 2; 1 = one at a time)")
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 2))
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--work-dir", default=None, help="inputs are cached here (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(sys.argv[1:])
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="caption-bench-"))
    passthrough = [a for a in sys.argv[1:] if a != "--only" and a not in ("throughput", "busy", "memory")]
    passthrough += ["--work-dir", str(work)]
    sections = args.only or ["throughput", "busy", "memory"]
    print(f"caption pipeline benchmark: {os.cpu_count()} cores, Ray local with {args.num_cpus:g} CPUs, "
          f"batch {args.batch_size}, inputs in Parquet files of 1,000 rows, work dir {work}")
    if "throughput" in sections:
        bare = run_child("bare", passthrough)
        bare1 = run_child("bare1", passthrough)
        job = run_child("job", passthrough)
        print(f"\n[1] throughput, {args.images} images 256x192, model {args.model}, {args.max_new_tokens} new tokens")
        print(f"    bare loop (decode + caption, no Ray): {bare['images_per_s']:.1f} images/s ({bare['wall_s']:.1f} s)")
        print(f"    bare loop, torch on 1 thread:         {bare1['images_per_s']:.1f} images/s "
              f"({bare1['wall_s']:.1f} s; a Ray actor's default)")
        print(f"    job, whole run_caption_job call:      {job['images_per_s_wall']:.1f} images/s "
              f"({job['wall_s']:.1f} s) = {job['images_per_s_wall'] / bare['images_per_s']:.1%} of the loop")
        print(f"    job, first to last model batch:       {job['images_per_s_steady']:.1f} images/s "
              f"= {job['images_per_s_steady'] / bare['images_per_s']:.1%} of the loop")
    if "busy" in sections:
        busy = run_child("busy", passthrough)
        print(f"\n[2] caption actor busy share, stand-in sleeping {args.batch_size / 100:g} s per batch of "
              f"{args.batch_size} (~100 images/s), {args.busy_images} images")
        print(f"    inside the model / actor's first-to-last batch: {busy['busy_share_steady']:.1%}  "
              f"({busy['images_per_s_steady']:.1f} images/s)")
        print(f"    inside the model / whole pipeline incl. start:  {busy['busy_share_pipeline']:.1%}")
    if "memory" in sections:
        small, large = (int(x) for x in args.memory_rows.split(","))
        a = run_child(f"memory:{small}", passthrough)
        b = run_child(f"memory:{large}", passthrough)
        print("\n[3] peak memory, driver + all Ray processes (summed), stand-in model, 64x48 images")
        for rows, m in ((small, a), (large, b)):
            print(f"    {rows:>7} rows: peak PSS {m['peak_pss_mb']:.0f} MB, peak USS {m['peak_uss_mb']:.0f} MB "
                  f"(max {m['peak_processes']} processes), steady USS {m['steady_uss_mb']:.0f} MB, "
                  f"{m['wall_s']:.1f} s, succeeded={m['succeeded']}")
        print(f"    ratio at {large // small}x rows: peak PSS {b['peak_pss_mb'] / a['peak_pss_mb']:.2f}x, "
              f"peak USS {b['peak_uss_mb'] / a['peak_uss_mb']:.2f}x, steady USS "
              f"{b['steady_uss_mb'] / a['steady_uss_mb']:.2f}x")
        print("    (PSS counts shared pages, the object store included, once; USS is private memory; 'steady' is "
              "the median over the second half of the run - peaks include transient Ray worker processes)")


if __name__ == "__main__":
    main()

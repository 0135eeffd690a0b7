"""Paint job benchmark: images/s of the whole render job (local Ray, paint actor pool, writers, resume bookkeeping)
against a bare Python loop calling the same model with the same settings and batch size (no Ray, no files), and
the cost of `--bitwise-reproducible` (one image per model call): the loop at batch 1 and the job with the flag.

Each measurement runs in a fresh subprocess. The default is the tiny random model on CPU (what any machine can run);
on a GPU machine pass e.g. `--model /models/viscpm-paint --size 512 --steps 20 --num-gpus 1`.

    python benchmarks/paint_pipeline.py                               # tiny, 64x64, 48 images, DPM-Solver++ 10 steps
    python benchmarks/paint_pipeline.py --images 200 --batch-size 8 --num-cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def prompts(n: int) -> list[str]:
    subjects = ["一只猫", "a lighthouse", "雨夜的街道", "a red bicycle", "山间的湖泊", "a bowl of fruit"]
    return [f"{subjects[i % len(subjects)]} #{i}" for i in range(n)]


def bare_loop(args: argparse.Namespace) -> dict:
    """The model alone: batches of `--batch-size` prompts, one seed per image, PNG-encoded like the job."""
    import torch

    from pipelines.paint.stage import encode_image
    from pipelines.paint.prompts import derive_seed
    from viscpm import PaintModel, SamplingConfig

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() and args.num_gpus else "cpu"
    model = PaintModel.from_pretrained(args.model, device=device)
    size = int(args.size) if args.size else None
    sampling = SamplingConfig(num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size,
                              scheduler="dpmsolver++")
    texts = prompts(args.images)
    seeds = [derive_seed(0, str(i + 1), 0) for i in range(args.images)]
    batch = 1 if args.bitwise_reproducible else args.batch_size
    model.generate(texts[:batch], seeds=seeds[:batch], sampling=sampling, output="np")  # warm-up
    started = time.perf_counter()
    for i in range(0, args.images, args.batch_size):
        results = model.generate(texts[i:i + args.batch_size], seeds=seeds[i:i + args.batch_size],
                                 sampling=sampling, output="np", batch_size=batch)
        for r in results:
            encode_image(r.image, "png")
    seconds = time.perf_counter() - started
    return {"images": args.images, "seconds": seconds, "images_per_s": args.images / seconds}


def job(args: argparse.Namespace) -> dict:
    """The whole job through `jobs/paint.py`'s runner on a fresh local Ray."""
    import ray

    from pipelines.paint.config import PaintJobConfig
    from pipelines.paint.job import run_paint_job

    ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus or None, include_dashboard=False,
             log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prompts.txt"
        source.write_text("\n".join(prompts(args.images)) + "\n", encoding="utf-8")
        config = PaintJobConfig(input=str(source), output=str(Path(tmp) / "out"), model=args.model,
                                steps=args.steps, size=args.size, scheduler="dpmsolver", batch_size=args.batch_size,
                                num_workers=1, rows_per_file=64, torch_threads=args.torch_threads,
                                bitwise_reproducible=args.bitwise_reproducible)
        started = time.perf_counter()
        result = run_paint_job(config)
        seconds = time.perf_counter() - started
    assert result.succeeded and result.ok == args.images, result.one_line()
    actor = next(iter(result.actors.values()))
    busy = actor["last_end"] - actor["first_start"]
    return {"images": args.images, "seconds": seconds, "images_per_s": args.images / seconds,
            "first_to_last_batch_s": busy, "steady_images_per_s": args.images / busy,
            "model_share_of_steady": actor["model_s"] / busy}


def run_in_subprocess(what: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_run", what, *argv], capture_output=True, text=True,
                         env={**os.environ, **ENV}, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", default=None, help="N: NxN images (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--torch-threads", type=int, default=2, help="CPU only: threads of the model (both sides)")
    parser.add_argument("--bitwise-reproducible", action="store_true", help=argparse.SUPPRESS)  # set per run
    parser.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        print(json.dumps(bare_loop(args) if args._run == "bare" else job(args)))
        return
    argv = sys.argv[1:]
    bare = run_in_subprocess("bare", argv)
    whole = run_in_subprocess("job", argv)
    bare_1 = run_in_subprocess("bare", [*argv, "--bitwise-reproducible"])
    exact = run_in_subprocess("job", [*argv, "--bitwise-reproducible"])
    print(f"paint pipeline benchmark ({time.strftime('%Y-%m-%d')}): model {args.model}, {args.images} images, "
          f"DPM-Solver++ {args.steps} steps, batch {args.batch_size}, size {args.size or 'model default'}")
    for name, loop, job_run in ((f"batch {args.batch_size}", bare, whole), ("bitwise (1/call)", bare_1, exact)):
        print(f"  {name:17s} bare loop {loop['images_per_s']:.2f} images/s | job {job_run['images_per_s']:.2f} "
              f"images/s whole ({job_run['seconds']:.1f} s incl. Ray/actor start, "
              f"{100 * job_run['images_per_s'] / loop['images_per_s']:.0f}% of the loop), "
              f"{job_run['steady_images_per_s']:.2f} first-to-last batch "
              f"({100 * job_run['steady_images_per_s'] / loop['images_per_s']:.0f}%), actor in the model "
              f"{100 * job_run['model_share_of_steady']:.1f}%")
    print(f"  --bitwise-reproducible costs {100 * (1 - bare_1['images_per_s'] / bare['images_per_s']):.1f}% "
          f"(loop) / {100 * (1 - exact['steady_images_per_s'] / whole['steady_images_per_s']):.1f}% (job, steady)")

if __name__ == "__main__":
    main()

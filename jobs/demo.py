"""`make demo`: both jobs on a local Ray with the tiny models, no downloads, no GPU (under a minute on 2 cores).

1. Caption: 64 synthetic images -> a local Parquet file -> `jobs/caption.py` -> a few output rows + the summary.
2. Paint: a handful of prompts (Chinese and English, one with `<ans>`-like text) -> `jobs/paint.py` -> WebDataset
   shards + `_report.html`, a contact sheet to open in a browser.

The tiny models have RANDOM weights: captions are random text and images are noise-like pictures. The point is the
pipeline (decode, per-row errors, actors, writer, resume, reconciliation, seeds). With real weights:

    python jobs/demo.py --model /path/to/viscpm-chat --paint-model /path/to/viscpm-paint
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the demo runs from a checkout

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from testing.synthetic import synthetic_images_table  # noqa: E402

NUM_IMAGES = 64
PROMPTS = [
    {"key": "cat-moon", "prompt": "一只猫坐在月亮上，水彩画"},
    {"key": "lighthouse", "prompt": "a lighthouse on a cliff at sunset, oil painting"},
    {"key": "tea", "prompt": "桌上的一杯绿茶，摄影作品", "negative_prompt": "模糊"},
    {"key": "robot", "prompt": "a small robot watering flowers, children's book illustration"},
    {"key": "city", "prompt": "雨夜的城市街道，霓虹灯"},
    {"key": "odd", "prompt": "<ans> is not a special token here: a < b </s>"},
]


def make_input(folder: Path) -> Path:
    """64 synthetic pictures, two of them deliberately broken to show per-row errors."""
    table = synthetic_images_table(NUM_IMAGES, size=(256, 192))
    images = table["image"].to_pylist()
    images[7] = images[7][: len(images[7]) // 3]  # truncated JPEG
    images[21] = b"this is not an image"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.parquet"
    pq.write_table(table, path, row_group_size=16)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"), help="folder for the demo's input and output")
    parser.add_argument("--model", default="tiny", help="tiny (random weights) or a VisCPM-Chat model folder")
    parser.add_argument("--paint-model", default="tiny", help="tiny (random weights) or a VisCPM-Paint model folder")
    parser.add_argument("--num-cpus", default="2", help="CPUs of the local Ray the demo starts")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    source = make_input(out / "input")
    captions = out / "captions"
    print(f"demo: wrote {NUM_IMAGES} synthetic images (2 broken on purpose) to {source}")
    command = [sys.executable, str(REPO / "jobs" / "caption.py"), "--input", str(source), "--id-column", "id",
               "--image-column", "image", "--keep-columns", "description", "--output", str(captions),
               "--model", args.model, "--max-new-tokens", "16", "--batch-size", "8", "--rows-per-file", "32",
               "--num-cpus", args.num_cpus, "--overwrite", "--no-progress-bars"]
    print("demo: running", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=REPO)
    if code != 0:
        print(f"demo: the caption job failed with exit status {code}")
        return code
    table = pq.read_table(captions)  # `_`-prefixed bookkeeping files are skipped by readers
    rows = sorted(table.select(["key", "status", "description", "caption", "error_message"]).to_pylist(),
                  key=lambda r: r["key"])
    print(f"\ndemo: {table.num_rows} output rows in {captions} ({time.monotonic() - started:.0f} s). A few of them:")
    for row in [r for r in rows if r["status"] == "ok"][:4] + [r for r in rows if r["status"] == "error"]:
        text = row["caption"] if row["status"] == "ok" else f"ERROR {row['error_message']}"
        print(f"  {row['key']}  [{row['description']}]  {text[:90]!r}")
    if args.model == "tiny":
        print("  (the tiny model has random weights: its captions are random text)")
    summary = json.loads((captions / "_summary.json").read_text())
    recon = summary["reconciliation"]
    print(f"\ndemo: summary ({captions / '_summary.json'}): {summary['processed_this_run']} rows processed, "
          f"{recon['ok_rows']} ok / {recon['error_rows']} error, every input id in the output exactly once: "
          f"{recon['ok']}; {summary['images_per_s']:.1f} images/s")
    return paint_demo(out, args.paint_model, args.num_cpus)


def paint_demo(out: Path, model: str, num_cpus: str) -> int:
    """Render PROMPTS (2 images each) into WebDataset shards and write the contact sheet."""
    prompts = out / "input" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    renders = out / "renders"
    steps = "10" if model == "tiny" else "20"
    command = [sys.executable, str(REPO / "jobs" / "paint.py"), "--input", str(prompts), "--output", str(renders),
               "--model", model, "--images-per-prompt", "2", "--steps", steps, "--scheduler", "dpmsolver",
               "--seed", "1", "--batch-size", "4", "--rows-per-file", "4", "--num-cpus", num_cpus, "--report",
               "--overwrite", "--no-progress-bars"]
    print(f"\ndemo: rendering {len(PROMPTS)} prompts x 2 images: ", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=REPO)
    if code != 0:
        print(f"demo: the paint job failed with exit status {code}")
        return code
    summary = json.loads((renders / "_summary.json").read_text())
    recon = summary["reconciliation"]
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(recon["statuses"].items()))
    print(f"\ndemo: {recon['output_rows']} images ({statuses}) in {renders} as WebDataset shards "
          f"({', '.join(sorted(p.name for p in renders.glob('part-*.tar')))}), {time.monotonic() - started:.0f} s; "
          f"every (prompt, image) pair exactly once: {recon['ok']}")
    print(f"demo: contact sheet (open it in a browser): {renders / '_report.html'}")
    if model == "tiny":
        print("  (the tiny model has random weights: its images are not pictures of the prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

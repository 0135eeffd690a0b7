"""`make demo`: both jobs on a local Ray with the `shapes` models, no downloads, no GPU (under 2 minutes on 2 cores).

1. Caption: 64 fresh pictures of coloured shapes (2 of them broken on purpose) -> a local Parquet file ->
   `jobs/caption.py`, each asked in English or Chinese -> the captions next to the truth, and the summary.
2. Paint: shape prompts in English and Chinese -> `jobs/paint.py` -> WebDataset shards + `_report.html`.

Then `demo.html` puts it side by side: each picture with its truth and caption, each prompt with its pictures.

`shapes` is a pair of small VisCPM models (our architecture unchanged, just small) trained on this synthetic task in
about 15 minutes on a CPU (tools/train_shapes.py): a proof that the whole stack computes something meaningful, not a
useful model. `--model tiny --paint-model tiny` shows the random-weight test models; with real weights:

    python jobs/demo.py --model /path/to/viscpm-chat --paint-model /path/to/viscpm-paint
"""

from __future__ import annotations

import argparse
import html
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the demo runs from a checkout
sys.path.insert(0, str(REPO / "tools"))  # the shapes task's picture generator

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import shapes_data as D  # noqa: E402
from pipelines.paint.report import thumbnail_data_uri  # noqa: E402

NUM_IMAGES = 64
DEMO_SEED = 31_337  # not the training seed: these pictures are new to the model
PROMPTS = [
    {"key": "red-circle", "prompt": "a red circle"},
    {"key": "blue-square-zh", "prompt": "一个蓝色的正方形"},
    {"key": "green-triangle", "prompt": "a green triangle"},
    {"key": "yellow-circle-zh", "prompt": "一个黄色的圆形"},
    {"key": "yellow-square", "prompt": "a yellow square"},
    {"key": "red-triangle-zh", "prompt": "一个红色的三角形"},
]


def make_input(folder: Path) -> Path:
    """64 shape pictures (64-320 px, PNG/JPEG), each with a question in English or Chinese and the true caption in
    that language; two of them deliberately broken to show per-row errors."""
    rng = random.Random(DEMO_SEED)
    ids, images, questions, truths = [], [], [], []
    for i in range(NUM_IMAGES):
        label, data = D.sample_file(rng)
        lang = ("en", "zh")[i % 2]
        ids.append(f"img-{i:06d}")
        images.append(data)
        questions.append(D.QUESTION[lang] if i % 4 < 2 else rng.choice(D.HELD_OUT_QUESTIONS[lang]))
        truths.append(label.caption(lang))
    images[7] = images[7][: len(images[7]) // 3]  # truncated file
    images[21] = b"this is not an image"
    table = pa.table({"id": ids, "image": pa.array(images, pa.binary()), "question": questions, "truth": truths})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "samples.parquet"
    pq.write_table(table, path, row_group_size=16)
    return path


def write_sheet(out: Path, source: Path, captions: Path, renders: Path) -> tuple[Path, int, int]:
    """demo.html: caption rows (picture, truth, question, caption) and paint rows (prompt, its pictures). Returns
    (its path, painted pictures whose colour and shape match the prompt by D.classify_pixels, pictures)."""
    pictures = {r["id"]: r["image"] for r in pq.read_table(source, columns=["id", "image"]).to_pylist()}
    rows = sorted(pq.read_table(captions).to_pylist(), key=lambda r: r["key"])
    cells = []
    for row in rows:
        # an error row's input is one of the broken files: nothing to show
        picture = (f'<img src="{thumbnail_data_uri(pictures[row["key"]], 96)}">' if row["status"] == "ok"
                   else "<i>unreadable</i>")
        said = row["caption"] if row["status"] == "ok" else f"ERROR {row['error_message']}"
        cells.append(f"<tr><td>{picture}</td><td>{html.escape(row['key'])}</td><td>{html.escape(row['truth'])}</td>"
                     f"<td>{html.escape(row['question'] or '')}</td><td><b>{html.escape(said or '')}</b></td></tr>")
    painted: dict[str, list[bytes]] = {}
    meta: dict[str, dict] = {}
    for shard in sorted(renders.glob("part-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                stem, _, suffix = info.name.rpartition(".")
                data = tar.extractfile(info).read()
                if suffix == "json":
                    meta[stem] = json.loads(data)
                else:
                    painted.setdefault(stem, []).append(data)
    by_prompt: dict[str, list[str]] = {}
    right = total = 0
    for key in sorted(meta):
        for data in painted.get(key, []):
            by_prompt.setdefault(meta[key]["prompt"], []).append(f'<img src="{thumbnail_data_uri(data, 128)}">')
            from PIL import Image

            total += 1
            right += D.classify_pixels(Image.open(io.BytesIO(data))) == D.parse_caption(meta[key]["prompt"])[1:]
    paint_rows = "".join(f"<tr><td><b>{html.escape(p)}</b></td><td>{''.join(imgs)}</td></tr>"
                         for p, imgs in by_prompt.items())
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>viscpm-batch demo</title><style>"
            "body{font-family:sans-serif}td{padding:4px 10px;vertical-align:middle}img{margin:2px}</style></head><body>"
            "<h1>Paint: prompt and pictures</h1><table>" + paint_rows + "</table>"
            "<h1>Caption: picture, truth, question, caption</h1><table>" + "".join(cells) + "</table></body></html>")
    path = out / "demo.html"
    path.write_text(page, encoding="utf-8")
    return path, right, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"), help="folder for the demo's input and output")
    parser.add_argument("--model", default="shapes",
                        help="shapes (trained on this task), tiny (random weights) or a VisCPM-Chat model folder")
    parser.add_argument("--paint-model", default="shapes",
                        help="shapes (trained on this task), tiny (random weights) or a VisCPM-Paint model folder")
    parser.add_argument("--num-cpus", default="2", help="CPUs of the local Ray the demo starts")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    source = make_input(out / "input")
    captions = out / "captions"
    print(f"demo: wrote {NUM_IMAGES} shape pictures (2 broken on purpose), asked in English or Chinese, to {source}")
    command = [sys.executable, str(REPO / "jobs" / "caption.py"), "--input", str(source), "--id-column", "id",
               "--image-column", "image", "--question-column", "question", "--keep-columns", "truth",
               "--output", str(captions),
               "--model", args.model, "--max-new-tokens", "16", "--batch-size", "8", "--rows-per-file", "32",
               "--num-cpus", args.num_cpus, "--overwrite", "--no-progress-bars"]
    print("demo: running", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=REPO)
    if code != 0:
        print(f"demo: the caption job failed with exit status {code}")
        return code
    table = pq.read_table(captions)  # `_`-prefixed bookkeeping files are skipped by readers
    rows = sorted(table.select(["key", "status", "question", "truth", "caption", "error_message"]).to_pylist(),
                  key=lambda r: r["key"])
    print(f"\ndemo: {table.num_rows} output rows in {captions} ({time.monotonic() - started:.0f} s). A few of them:")
    print(f"  {'key':<11} {'truth':<16} {'question':<24} caption")
    for row in [r for r in rows if r["status"] == "ok"][:8] + [r for r in rows if r["status"] == "error"]:
        text = row["caption"] if row["status"] == "ok" else f"ERROR {row['error_message']}"
        print(f"  {row['key']:<11} {row['truth']:<16} {(row['question'] or '')[:24]:<24} {text[:70]!r}")
    ok = [r for r in rows if r["status"] == "ok"]
    right = sum(D.parse_caption(r["caption"]) == D.parse_caption(r["truth"]) for r in ok)
    print(f"  {right} of {len(ok)} captions name the right colour and shape in the question's language")
    if args.model == "tiny":
        print("  (the tiny model has random weights: its captions are random text)")
    summary = json.loads((captions / "_summary.json").read_text())
    recon = summary["reconciliation"]
    print(f"\ndemo: summary ({captions / '_summary.json'}): {summary['processed_this_run']} rows processed, "
          f"{recon['ok_rows']} ok / {recon['error_rows']} error, every input id in the output exactly once: "
          f"{recon['ok']}; {summary['images_per_s']:.1f} images/s")
    code = paint_demo(out, args.paint_model, args.num_cpus)
    if code == 0:
        sheet, right, total = write_sheet(out, source, captions, out / "renders")
        print(f"demo: {right} of {total} pictures show the prompt's colour and shape (a simple pixel check)")
        print(f"\ndemo: captions and pictures side by side (open it in a browser): {sheet}")
    return code


def paint_demo(out: Path, model: str, num_cpus: str) -> int:
    """Render PROMPTS (2 images each) into WebDataset shards and write the job's contact sheet."""
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

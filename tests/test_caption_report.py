"""The caption job's `--report` contact sheet: one self-contained page from a real run (error rows first, zh text,
UTF-8 declared, images as data URIs read back from the input), the input read-back for every input format, and a
render in headless Chromium where it is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_fixtures import jpeg, png, write_webdataset_shards
from pipelines import CaptionJobConfig, run_caption_job
from pipelines.caption.readers import plan_input
from pipelines.caption.report import choose_sample, input_images

FAST = {"max_new_tokens": 8, "batch_size": 4, "rows_per_file": 4, "decode_batch_size": 4, "num_gpus_per_worker": 0,
        "progress_every_s": 0.5, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report_run(ray_session, tmp_path_factory):
    """One real caption run with --report: 6 good pictures, 2 that do not decode, a zh question (`shapes` answers
    in zh), WebDataset output."""
    tmp = tmp_path_factory.mktemp("report")
    ids = [f"img-{i}" for i in range(6)] + ["bad-truncated", "bad-empty"]
    images = [jpeg(size=(96, 64), colour=(40 * i, 120, 200)) for i in range(6)]
    images += [images[0][:40], b""]
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), tmp / "in.parquet")
    config = CaptionJobConfig(input=str(tmp / "in.parquet"), output=str(tmp / "out"), model="shapes",
                              output_format="webdataset", question="图片里有什么？", report=True, **FAST)
    return config, run_caption_job(config), ids


def test_caption_report_from_a_real_run(report_run):
    config, result, ids = report_run
    out = Path(config.output)
    assert result.succeeded and result.reconciliation.statuses == {"ok": 6, "error": 2}
    assert result.report == str(out / "_report.html")
    page = (out / "_report.html").read_text(encoding="utf-8")

    assert page.startswith("<!doctype html>") and '<meta charset="utf-8">' in page
    assert "Noto Sans CJK SC" in page and "Microsoft YaHei" in page  # CJK fallbacks in the font stack
    statuses = re.findall(r'<figure class="(ok|error)">', page)
    assert statuses == ["error"] * 2 + ["ok"] * 6  # errors first
    keys = re.findall(r"<figcaption><b>([^<]+)</b>", page)
    assert keys[:2] == ["bad-empty", "bad-truncated"] and sorted(keys[2:]) == ids[:6]
    assert page.count('<img src="data:image/png;base64,') == 6  # the ok rows' pictures, embedded
    assert 'lang="zh">图片里有什么？' in page and "一个" in page  # the zh question and the shapes model's zh answers
    assert not re.search(r'(src|href)="(https?:|file:|//)', page)  # self-contained
    assert "decode: " in page  # the error rows say why

    rerun = run_caption_job(config)  # a finished job: nothing to do, the same sheet again
    again = (out / "_report.html").read_text(encoding="utf-8")
    assert rerun.processed == 0 and re.findall(r"<figcaption><b>([^<]+)</b>", again) == keys


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    page = Path(report_run[0].output) / "_report.html"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,900", f"--screenshot={shot}",
                    f"file://{page}"], check=True, capture_output=True, timeout=120)
    rendered = Image.open(shot).convert("RGB")
    assert rendered.size == (1200, 900)
    colours = rendered.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    # the thumbnails' blue/purple fills are on screen: the embedded pictures decoded in the browser
    assert sum(n for n, (r, g, b) in colours if b > 150 and r < 220 and g < 160) > 6 * 40 * 40


def test_choose_sample_errors_first_then_a_deterministic_sample() -> None:
    keys = [f"k{i:03d}" for i in range(100)]
    index = pa.table({"key": keys, "status": ["error" if i % 10 == 0 else "ok" for i in range(100)]})
    sample = choose_sample(index, 12)
    # errors take at most half the sheet when there are other rows; each part evenly spaced over its sorted keys
    assert sample == ["k000", "k010", "k030", "k050", "k060", "k080"] + ["k001", "k017", "k034", "k051", "k067",
                                                                          "k084"]
    assert choose_sample(index.take(list(range(99, -1, -1))), 12) == sample  # file order does not matter
    few_ok = pa.table({"key": [f"e{i}" for i in range(10)] + ["a", "b"], "status": ["error"] * 10 + ["ok"] * 2})
    assert choose_sample(few_ok, 8) == ["e0", "e1", "e3", "e5", "e6", "e8", "a", "b"]  # errors fill what is left
    assert choose_sample(pa.table({"key": ["b", "a"], "status": ["error", "error"]}), 12) == ["a", "b"]


def test_input_images_of_every_input_format(tmp_path) -> None:
    """The report's read-back by key: image files, Parquet bytes (row groups), Parquet paths, WebDataset shards."""
    pictures = {f"p{i}": png(Image.new("RGB", (8 + i, 8), (i * 30, 0, 0))) for i in range(5)}
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for key, data in pictures.items():
        (folder / f"{key}.png").write_bytes(data)
    plan = plan_input(CaptionJobConfig(input=str(tmp_path / "images"), input_format="images", output="x"))
    assert input_images(plan, None, ["sub/p1.png", "sub/p4.png"], {}) == {
        "sub/p1.png": pictures["p1"], "sub/p4.png": pictures["p4"]}

    table = pa.table({"id": list(pictures), "image": pa.array(list(pictures.values()), pa.binary()),
                      "path": [f"images/sub/{k}.png" for k in pictures]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)  # three row groups
    config = CaptionJobConfig(input=str(tmp_path / "rows.parquet"), output="x")
    found = input_images(plan_input(config), config, ["p0", "p3", "p4"], {})
    assert found == {k: pictures[k] for k in ("p0", "p3", "p4")}
    config = CaptionJobConfig(input=str(tmp_path / "rows.parquet"), image_column="path", output="x")
    assert input_images(plan_input(config), config, ["p2"], {}) == {"p2": pictures["p2"]}  # relative to the input

    samples = [{"__key__": k, "png": v, "txt": "x"} for k, v in pictures.items()]
    write_webdataset_shards(tmp_path / "shards", samples, 2)
    config = CaptionJobConfig(input=str(tmp_path / "shards"), input_format="webdataset", output="x")
    assert input_images(plan_input(config), config, ["p1", "p4"], {}) == {"p1": pictures["p1"], "p4": pictures["p4"]}


def test_report_is_refused_with_incremental() -> None:
    with pytest.raises(ValueError, match="--report .* not available with --incremental"):
        CaptionJobConfig(input="x", output="y", input_format="webdataset", incremental=True, report=True).validate()

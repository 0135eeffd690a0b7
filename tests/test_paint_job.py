"""The paint job end to end on the session's local Ray (2 CPUs, 2 fake GPUs): odd prompts from a .txt, webdataset
output read back with the `webdataset` library, byte-identical rerun into a new output, resume (nothing left to do),
--report contact sheet, parquet output."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
from PIL import Image

from pipelines.paint.config import PaintJobConfig
from pipelines.paint.job import run_paint_job

PROMPTS = ["a red cube", "画一只猫在月亮上", "", "  ", "<ans></s> a < b", "emoji 🐱🚀 \x1b[31m", "x" * 20_000]


def samples(folder):
    import webdataset as wds

    shards = sorted(str(p) for p in folder.glob("part-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}


def test_txt_to_webdataset_rerun_identical_resume_and_report(ray_session, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    config = PaintJobConfig(input=str(tmp_path / "prompts.txt"), output=str(tmp_path / "a"), images_per_prompt=2,
                            steps=2, guidance_scale=3.0, seed=11, batch_size=3, num_workers=2, rows_per_file=5,
                            report=True, actor_start_timeout_s=120, no_progress_timeout_s=120)
    result = run_paint_job(config)
    assert result.succeeded, result.reconciliation.problems()
    # lines 3 and 4 ("", "  ") are blank: no prompts; the other prompts are keyed by their line numbers
    assert (result.processed, result.ok, result.input_images) == (10, 10, 10)
    got = samples(tmp_path / "a")
    assert sorted(got) == sorted(f"{i}-{j}" for i in (1, 2, 5, 6, 7) for j in range(2))
    for key, sample in got.items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["status"] == "ok" and meta["size"] == "64x64"
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
    assert json.loads(got["7-0"]["json"])["prompt_truncated"] is True
    assert json.loads(got["2-1"]["json"])["prompt"] == PROMPTS[1]
    summary = json.loads((tmp_path / "a" / "_summary.json").read_text())
    assert summary["succeeded"] and summary["reconciliation"]["output_rows"] == 10
    assert summary["blank_lines_skipped"] == 2
    gpu_ids = [a["gpu_ids"] for a in summary["actors"].values()]  # fake-GPU pinning: one GPU each, not shared
    assert set(gpu_ids) <= {"0", "1"} and len(set(gpu_ids)) == len(gpu_ids) >= 1
    report = (tmp_path / "a" / "_report.html").read_text(encoding="utf-8")
    assert report.count("<img src=\"data:image/png;base64,") == 10 and "&lt;ans&gt;&lt;/s&gt;" in report

    again = run_paint_job(config)  # finished: nothing to do, reconciled again
    assert again.succeeded and again.processed == 0 and again.skipped == 10

    # the same command into a new output: byte-identical images (other batch sizes, worker counts and resumes:
    # tests/test_paint_job_e2e.py)
    other = run_paint_job(PaintJobConfig(**{**config.__dict__, "output": str(tmp_path / "b"), "report": False}))
    assert other.succeeded
    assert {k: s["png"] for k, s in samples(tmp_path / "b").items()} == {k: s["png"] for k, s in got.items()}


def test_jsonl_to_parquet_with_error_rows(ray_session, tmp_path):
    lines = [{"key": "a", "prompt": "cat", "seed": 3}, {"key": "b", "prompt": None}, {"key": "c", "prompt": "dog"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    result = run_paint_job(result_config(tmp_path))
    assert result.succeeded and (result.ok, result.error) == (2, 1)
    rows = {r["key"]: r for r in pq.read_table(next((tmp_path / "out").glob("part-*.parquet"))).to_pylist()}
    assert rows["a-0"]["seed"] == 3 and Image.open(io.BytesIO(rows["a-0"]["image"])).format == "PNG"
    assert rows["b-0"]["status"] == "error" and rows["b-0"]["image"] is None
    config = PaintJobConfig(**{**result_config(tmp_path).__dict__, "retry_errors": True})
    retry = run_paint_job(config)  # only the error row is rendered again; every key stays exactly once
    assert retry.succeeded and retry.skipped == 2 and retry.processed == 1
    assert sorted(pq.read_table(str(tmp_path / "out"))["key"].to_pylist()) == ["a-0", "b-0", "c-0"]


def result_config(tmp_path):
    return PaintJobConfig(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "out"), output_format="parquet",
                          steps=2, num_workers=1, actor_start_timeout_s=120, no_progress_timeout_s=120)


def test_s3_csv_in_webdataset_out_with_report(ray_session, s3, tmp_path):
    """S3 in and out, configured only by the AWS_* variables the `s3` fixture sets in this process (the Ray
    workers never see them: the pipeline must carry the settings)."""
    bucket = s3.bucket("paint-bucket")
    fs = s3.fs()
    fs.pipe_file(f"{bucket}/prompts/list.csv", 'key,prompt,seed\nzh,"画一只猫\n在月亮上",7\nen,a red cube,\n'.encode())
    config = PaintJobConfig(input=f"s3://{bucket}/prompts/list.csv", output=f"s3://{bucket}/renders/run1",
                            steps=2, num_workers=1, report=True, actor_start_timeout_s=120, no_progress_timeout_s=120)
    result = run_paint_job(config)
    assert result.succeeded, result.reconciliation.problems()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/renders/run1", refresh=True))
    assert {"_summary.json", "_job.json", "_report.html", "_checkpoint"} <= set(names)
    local = tmp_path / "back"
    local.mkdir()
    for name in (n for n in names if n.endswith(".tar")):
        fs.get_file(f"{bucket}/renders/run1/{name}", str(local / name))
    got = samples(local)
    assert sorted(got) == ["en-0", "zh-0"]
    zh = json.loads(got["zh-0"]["json"])
    assert zh["prompt"] == "画一只猫\n在月亮上" and zh["seed"] == 7
    assert Image.open(io.BytesIO(got["zh-0"]["png"])).size == (64, 64)

"""`jobs/paint.py` as a program: SIGKILL of the driver mid-run then the same command again (each (prompt, image)
pair exactly once), and refusals with exit status 2. Each job starts its own local Ray (`--num-cpus`)."""

from __future__ import annotations

import json
import subprocess

from pipeline_fixtures import PYTHON, REPO_ROOT, job_env, kill_driver_mid_run

PAINT = str(REPO_ROOT / "jobs" / "paint.py")


def read_keys(out) -> list[str]:
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("part-*.tar"))
    return [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)] if shards else []


def test_sigkill_driver_mid_run_then_rerun_completes_each_image_once(tmp_path):
    n = 20
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i} 画" for i in range(n)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    command = [PYTHON, PAINT, "--input", str(tmp_path / "p.txt"), "--output", str(out), "--steps", "8", "--size", "32",
               "--images-per-prompt", "2", "--batch-size", "2", "--rows-per-file", "2", "--num-cpus", "2",
               "--object-store-memory", str(256 << 20), "--no-progress-bars", "--no-progress-timeout-s", "120",
               "--actor-start-timeout-s", "120"]
    kill_driver_mid_run(command, out, cwd=tmp_path, timeout=120)
    first = len(read_keys(out))
    assert 0 < first < 2 * n, first

    rerun = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    keys = read_keys(out)
    assert sorted(keys) == sorted(f"{i}-{j}" for i in range(1, n + 1) for j in range(2))  # exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["run"] == 2 and summary["reconciliation"]["ok"] is True
    assert summary["skipped_already_done"] + summary["processed_this_run"] == 2 * n


def test_refusals_exit_with_status_2(tmp_path):
    bad = subprocess.run([PYTHON, PAINT, "--output", str(tmp_path / "o"), "--steps", "0"], env=job_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--input is required" in bad.stderr and "--steps must be >= 1" in bad.stderr
    (tmp_path / "p.jsonl").write_text('{"key": 1, "prompt": "a"}\n{"key": 1, "prompt": "b"}\n', encoding="utf-8")
    dup = subprocess.run([PYTHON, PAINT, "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o"),
                          "--num-cpus", "1"], env=job_env(), capture_output=True, text=True, timeout=120)
    assert dup.returncode == 2 and "more than once" in dup.stderr and not (tmp_path / "o").exists()


def test_acceptance_flags_s3_in_and_parquet_out(s3, tmp_path):
    """The command shape acceptance uses - exactly its flags, S3 configured only by the AWS_* variables (set by the
    `s3` fixture in this process and inherited by the job) - as a program with its own Ray."""
    import io as _io

    import pyarrow.parquet as pq
    from PIL import Image

    bucket = s3.bucket("paint-cli")
    fs = s3.fs()
    lines = [{"key": "zh", "text": "一只猫坐在月亮上"}, {"key": "en", "text": "a lighthouse at dusk"},
             {"key": "odd", "text": "<ans> a < b </s>"}, {"key": "null", "text": None}]
    fs.pipe_file(f"{bucket}/in/prompts.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
                 .encode("utf-8"))
    command = [PYTHON, PAINT, "--input", f"s3://{bucket}/in/prompts.jsonl", "--prompt-column", "text",
               "--output", f"s3://{bucket}/out/", "--output-format", "parquet", "--model", "tiny",
               "--images-per-prompt", "2", "--steps", "3", "--guidance-scale", "5", "--size", "64", "--seed", "3",
               "--scheduler", "dpmsolver", "--batch-size", "2", "--num-workers", "1", "--num-gpus-per-worker", "0"]
    done = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "paint job done: 8 images this run (6 ok, 2 error)" in done.stderr
    files = [p for p in fs.ls(f"{bucket}/out", refresh=True) if p.endswith(".parquet") and "/_" not in p]
    table = pq.read_table([f"s3://{p}" for p in files], filesystem=fs).sort_by("key")
    rows = {r["key"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(f"{k}-{j}" for k in ("zh", "en", "odd", "null") for j in range(2))
    for key, row in rows.items():
        assert (row["steps"], row["guidance_scale"], row["scheduler"], row["size"]) == (3, 5.0, "dpmsolver", "64x64")
        if key.startswith("null"):
            assert row["status"] == "error" and row["image"] is None and "prompt" in row["error_message"]
        else:
            assert row["status"] == "ok" and Image.open(_io.BytesIO(row["image"])).size == (64, 64)
    assert rows["odd-1"]["prompt"] == "<ans> a < b </s>"
    summary = json.loads(fs.cat_file(f"{bucket}/out/_summary.json"))
    assert summary["reconciliation"]["ok"] and summary["reconciliation"]["statuses"] == {"ok": 6, "error": 2}

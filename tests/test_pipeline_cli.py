"""`jobs/caption.py` as a program: SIGKILL of the driver mid-run then the same command again (each id exactly
once), `ray job submit` against a `ray start --head` on loopback, `make demo`'s script, and exit codes.

Each job here is a subprocess that starts its own local Ray (`--num-cpus`), separate from the session's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import PYTHON, REPO_ROOT, job_env, kill_driver_mid_run, ray_head
from testing.synthetic import synthetic_images_table

CAPTION = str(REPO_ROOT / "jobs" / "caption.py")


def test_sigkill_driver_mid_run_then_rerun_completes_each_id_once(tmp_path):
    n = 40
    pq.write_table(synthetic_images_table(n, size=(48, 32)), tmp_path / "in.parquet", row_group_size=10)
    out = tmp_path / "out"
    # the caption job with a stand-in model that takes 0.2 s per call: slow enough to be killed mid-run
    command = [PYTHON, str(REPO_ROOT / "testing" / "standin_caption_job.py"), "--input", str(tmp_path / "in.parquet"),
               "--output", str(out), "--batch-size", "2", "--rows-per-file", "4", "--decode-batch-size", "4",
               "--num-cpus", "2", "--object-store-memory", str(256 << 20), "--no-progress-bars",
               "--no-progress-timeout-s", "120", "--actor-start-timeout-s", "120"]
    kill_driver_mid_run(command, out, cwd=tmp_path, timeout=90)
    first = pq.read_table(str(out)).num_rows if any(out.glob("part-*.parquet")) else 0
    assert 0 < first < n, first

    rerun = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    keys = pq.read_table(str(out))["key"].to_pylist()
    assert sorted(keys) == sorted(f"img-{i:06d}" for i in range(n))  # every id, exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["run"] == 2 and summary["skipped_already_done"] >= first - 8  # only what was missing
    assert summary["skipped_already_done"] + summary["processed_this_run"] == n
    assert summary["reconciliation"]["ok"] is True


def test_refusals_exit_with_status_2(tmp_path):
    bad = subprocess.run([PYTHON, CAPTION, "--output", str(tmp_path / "o"), "--batch-size", "0"], env=job_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--input is required" in bad.stderr and "--batch-size must be >= 1" in bad.stderr


@pytest.mark.slow
def test_ray_job_submit_to_a_head_on_loopback(tmp_path):
    pq.write_table(synthetic_images_table(10, size=(40, 30)), tmp_path / "in.parquet")
    env = job_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"
    ray_bin = str(Path(PYTHON).parent / "ray")
    with ray_head(tmp_path / "head.log", env) as (_, url):
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", url, "--working-dir", str(REPO_ROOT), "--", PYTHON,
             "jobs/caption.py", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
             "--model", "tiny", "--max-new-tokens", "4", "--no-progress-bars"],
            env=env, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "Connecting to existing Ray cluster" in submit.stdout
        assert "caption job done: 10 rows this run" in submit.stdout
        assert pq.read_table(str(tmp_path / "out")).num_rows == 10


@pytest.mark.slow
def test_demo_script(tmp_path):
    demo = subprocess.run([PYTHON, str(REPO_ROOT / "jobs" / "demo.py"), "--out", str(tmp_path / "demo")],
                          env=job_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "every input id in the output exactly once: True" in demo.stdout
    assert "62 ok / 2 error" in demo.stdout and "captions name the right colour and shape" in demo.stdout
    # the paint half: 6 prompts x 2 images, the job's contact sheet and the demo's side-by-side sheet
    assert "12 images (12 ok)" in demo.stdout and "every (prompt, image) pair exactly once: True" in demo.stdout
    report = (tmp_path / "demo" / "renders" / "_report.html").read_text(encoding="utf-8")
    assert report.count("<figure ") == 12 and "一个蓝色的正方形" in report
    sheet = (tmp_path / "demo" / "demo.html").read_text(encoding="utf-8")
    assert sheet.count("<img") == 12 + 62 and "一个红色的三角形" in sheet

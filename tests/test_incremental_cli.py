"""Scheduled runs as programs (`testing/standin_caption_job.py`, the caption CLI with a stand-in model that sleeps
per call): two overlapping runs (the second exits 2 at once naming the holder, the first finishes), SIGTERM mid-run
(a clean stop with exit status 3, lease released), SIGKILL mid-file (the lease is left behind), and the rerun that
takes the dead run's lease over and completes every shard with each id once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline_fixtures import PYTHON, REPO_ROOT, jpeg, job_env, wait_gone, write_webdataset_shards
from s3_proxy import wait_until

STANDIN = str(REPO_ROOT / "testing" / "standin_caption_job.py")


def shards(folder: Path, first: int, count: int, per_shard: int = 8) -> None:
    for i in range(first, first + count):
        samples = [{"__key__": f"s{i}-{j:03d}", "jpg": jpeg((24, 16))} for j in range(per_shard)]
        path = write_webdataset_shards(folder / f"tmp-{i}", samples, per_shard)[0]
        path.rename(folder / f"shard-{i:05d}.tar")
        (folder / f"tmp-{i}").rmdir()


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=job_env(STANDIN_SECONDS="0.25"), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def entries(out: Path, run: int) -> int:
    return len(list((out / "_manifest" / "entries").glob(f"r{run:06d}-*.json")))


def test_overlap_sigterm_sigkill_and_takeover(tmp_path):
    data, out = tmp_path / "in", tmp_path / "out"
    data.mkdir()
    shards(data, 0, 2)
    command = [PYTHON, STANDIN, "--input", str(data), "--input-format", "webdataset", "--output", str(out),
               "--incremental", "--batch-size", "2", "--rows-per-file", "100", "--decode-batch-size", "2",
               "--num-cpus", "2", "--object-store-memory", str(256 << 20), "--no-progress-bars",
               "--no-progress-timeout-s", "120", "--actor-start-timeout-s", "120", "--lease-ttl-s", "30"]
    first = start(command, tmp_path)
    try:
        assert wait_until(lambda: (out / "_lock").exists(), timeout=60)
        t0 = time.monotonic()
        second = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f":{first.pid} " in second.stderr and "in use by another run" in second.stderr
        assert time.monotonic() - t0 < 20  # refused at once, before Ray starts
        assert first.wait(timeout=120) == 0, first.stdout.read()
    finally:
        wait_gone(first, timeout=10)
    assert not (out / "_lock").exists()

    # SIGTERM mid-run: stops at once with status 3, keeps the finished files, releases the lease
    shards(data, 2, 3)
    term = start(command, tmp_path)
    try:
        assert wait_until(lambda: entries(out, 2) >= 1, timeout=90)
        t0 = time.monotonic()
        os.kill(term.pid, signal.SIGTERM)
        assert term.wait(timeout=40) == 3, term.stdout.read()
        assert time.monotonic() - t0 < 30
    finally:
        wait_gone(term, timeout=10)
    assert not (out / "_lock").exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["stopped"] and summary["files"]["done"] >= 1 and summary["files"]["pending"] >= 1

    # SIGKILL of the driver in the middle of a file: its lease stays behind, its staged rows too
    kill = start(command, tmp_path)
    try:
        lock = out / "_lock"

        def holds() -> bool:
            try:
                return json.loads(lock.read_text())["pid"] == kill.pid
            except (OSError, ValueError):
                return False

        assert wait_until(holds, timeout=60)
        since = lock.stat().st_mtime
        # this run has opened a file's staging store (its `_job.json` is written there when the file starts; the
        # SIGTERMed run left staging stores of its own, older). Polling for a staged data file instead raced: a
        # file's only data file is promoted and its staging store deleted within milliseconds
        assert wait_until(lambda: any(p.stat().st_mtime > since
                                      for p in (out / "_staging").glob("*/_job.json")), timeout=90)
        os.kill(kill.pid, signal.SIGKILL)
        kill.wait(timeout=10)
    finally:
        wait_gone(kill, timeout=10)
    assert json.loads((out / "_lock").read_text())["pid"] == kill.pid

    # the rerun takes the dead run's lease over (same host, process gone) and completes every shard
    rerun = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "took over" in rerun.stderr and f"process {kill.pid} on this host no longer exists" in rerun.stderr
    for i in range(5):
        keys = pq.read_table(out / f"shard-{i:05d}.parquet")["key"].to_pylist()
        assert keys == [f"s{i}-{j:03d}" for j in range(8)], (i, keys)  # each id once, sorted
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(5)]
    assert not (out / "_lock").exists() and not list((out / "_staging").glob("*"))

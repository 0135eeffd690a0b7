"""Mistakes with the output are refused before Ray starts, each naming its cause and its fix; Ctrl-C is the same
clean stop as SIGTERM (exit 130, no traceback, lease released, the rerun resumes); `--help` shows its examples and
every exit status; an id the tar format cannot carry as is (NUL) is escaped, never a rerun loop."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import PYTHON, REPO_ROOT, job_env, wait_gone
from pipelines import CaptionJobConfig, OutputConflictError, PaintJobConfig, run_caption_job
from pipelines.caption.schema import caption_members
from pipelines.core.output import OutputStore, Reconciliation
from pipelines.core.output.files import read_index
from pipelines.core.output.manifest import STATE_FILE
from pipelines.core.storage import locate
from pipelines.paint.schema import paint_members
from s3_proxy import wait_until
from testing.synthetic import synthetic_images_table

CAPTION = str(REPO_ROOT / "jobs" / "caption.py")
STANDIN = str(REPO_ROOT / "testing" / "standin_caption_job.py")
RAY_STARTED = "Started a local Ray instance"
FAST = {"max_new_tokens": 3, "beam_size": 2, "batch_size": 4, "rows_per_file": 4, "decode_batch_size": 4,
        "num_gpus_per_worker": 0, "progress_every_s": 0.5, "actor_start_timeout_s": 60, "no_progress_timeout_s": 60}


def no_ray() -> None:
    raise AssertionError("Ray was started before the output was refused")


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(synthetic_images_table(4, size=(40, 30)), folder / "in.parquet")
    return folder


def _caption_output(out: Path, config: CaptionJobConfig) -> None:
    """An output as a caption run leaves it (job file + a checkpointed data file), written by the output store."""
    store = OutputStore(locate(str(out)), "parquet", "caption", caption_members)
    store.start_run(config.fingerprint(), "normal")
    (out / "_checkpoint").mkdir(exist_ok=True)
    (out / "_checkpoint" / "part-r0001-0000000000000000.parquet").write_bytes(b"")


def test_output_mistakes_are_refused_before_ray_naming_cause_and_fix(tmp_path, images):
    out = tmp_path / "out"
    base = CaptionJobConfig(input=str(images), output=str(out), model="tiny", **FAST)

    # another job's output: a paint job's
    paint = OutputStore(locate(str(out)), "parquet", "paint", paint_members)
    paint.start_run(PaintJobConfig(input="p.txt", output=str(out)).fingerprint(), "normal")
    (out / "_checkpoint").mkdir()
    (out / "_checkpoint" / "part-r0001-0000000000000000.parquet").write_bytes(b"")
    with pytest.raises(OutputConflictError, match="holds the output of a paint job, not of a caption job.*another"):
        run_caption_job(base, ray_init=no_ray)

    # the same job kind with another question: the setting and both values are named, and the fixes
    other = tmp_path / "other"
    _caption_output(other, CaptionJobConfig(input=str(images), output=str(other), question="What colour?"))
    with pytest.raises(OutputConflictError) as info:
        run_caption_job(CaptionJobConfig(input=str(images), output=str(other), model="tiny", question="Where?",
                                         **FAST), ray_init=no_ray)
    assert "question: 'What colour?' -> 'Where?'" in str(info.value) and "--overwrite" in str(info.value)

    # the output inside the input (its own files would be read as input next time), also spelled differently
    for output in (images / "captions", str(images) + "/./captions/"):
        with pytest.raises(OutputConflictError, match="is inside --input .*Use an --output outside"):
            run_caption_job(CaptionJobConfig(input=str(images) + "/", output=str(output), model="tiny", **FAST),
                            ray_init=no_ray)
    assert not (images / "captions").exists()

    # an --incremental output given to a normal run: said as such (not "files that are not part of a caption job")
    incremental = tmp_path / "incremental"
    incremental.mkdir()
    (incremental / STATE_FILE).write_text(json.dumps({"version": 1, "job": "caption", "last_run": 1,
                                                       "fingerprint": base.fingerprint()}))
    (incremental / "in.parquet").write_bytes(b"PAR1")  # the per-input-file output an incremental run writes
    with pytest.raises(OutputConflictError, match="holds the output of --incremental runs.*Add --incremental"):
        run_caption_job(CaptionJobConfig(input=str(images), output=str(incremental), model="tiny", **FAST),
                        ray_init=no_ray)

    # and a normal output given to an --incremental run
    normal = tmp_path / "normal"
    _caption_output(normal, base)
    with pytest.raises(OutputConflictError, match=r"normal \(not --incremental\) run. Use another --output"):
        run_caption_job(CaptionJobConfig(input=str(images), output=str(normal), model="tiny", incremental=True,
                                         **FAST), ray_init=no_ray)


def test_the_cli_refuses_an_incompatible_output_with_status_2_and_no_ray(tmp_path, images):
    out = tmp_path / "out"
    _caption_output(out, CaptionJobConfig(input=str(images), output=str(out), question="What colour?"))
    t0 = time.monotonic()
    proc = subprocess.run([PYTHON, CAPTION, "--input", str(images), "--output", str(out), "--model", "tiny",
                           "--question", "Where?"], env=job_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and RAY_STARTED not in proc.stderr, proc.stderr
    assert "refused: --output" in proc.stderr and "differs in question" in proc.stderr
    print(f"refused in {seconds:.1f} s")


def test_help_shows_the_examples_and_every_exit_status():
    proc = subprocess.run([PYTHON, CAPTION, "--help"], env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    example = next(i for i, line in enumerate(lines) if line.strip().startswith("python jobs/caption.py --input"))
    assert lines[example].endswith("\\") and lines[example + 1].strip().startswith("--model s3://")
    statuses = [line.split()[0] for line in lines[lines.index("exit status:") + 1:] if line[:5].strip().isdigit()]
    assert statuses == ["0", "1", "2", "3", "130"]


def test_rerun_is_advised_only_when_it_can_help():
    missing = Reconciliation(input_rows=2, output_rows=1, statuses={"ok": 1}, missing=["b"])
    duplicated = Reconciliation(input_rows=2, output_rows=3, statuses={"ok": 3}, duplicated=["a"])
    unexpected = Reconciliation(input_rows=2, output_rows=2, statuses={"ok": 2}, missing=["b"], unexpected=["c"])
    assert missing.rerun_helps and duplicated.rerun_helps and not unexpected.rerun_helps


def test_an_id_with_a_nul_byte_round_trips_through_a_webdataset_output(ray_session, tmp_path):
    table = synthetic_images_table(3, size=(40, 30))
    keys = ["x\0y", "x", "tab\there.\x7f"]  # "x" is what a NUL-truncated member name would read back as
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(keys))
    pq.write_table(table, tmp_path / "in.parquet")
    config = CaptionJobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model="tiny",
                              output_format="webdataset", **FAST)
    first = run_caption_job(config)
    assert first.succeeded and first.processed == 3, first.reconciliation.problems()
    names, found = [], []
    for tar_path in sorted((tmp_path / "out").glob("part-*.tar")):
        data = tar_path.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names += tar.getnames()
        found += read_index(data, "webdataset")["key"].to_pylist()
    assert sorted(found) == sorted(keys)
    assert "x%00y.json" in names and not any("\0" in n for n in names)
    again = run_caption_job(config)  # nothing left to do: the ids read back as themselves
    assert again.succeeded and again.processed == 0 and again.skipped == 3


@pytest.mark.slow
def test_ctrl_c_is_a_clean_stop_and_the_rerun_resumes(tmp_path):
    n = 40
    pq.write_table(synthetic_images_table(n, size=(48, 32)), tmp_path / "in.parquet", row_group_size=10)
    out = tmp_path / "out"
    command = [PYTHON, STANDIN, "--input", str(tmp_path / "in.parquet"), "--output", str(out), "--batch-size", "2",
               "--rows-per-file", "4", "--decode-batch-size", "4", "--num-cpus", "2", "--object-store-memory",
               str(256 << 20), "--no-progress-bars", "--no-progress-timeout-s", "120", "--actor-start-timeout-s",
               "120"]
    proc = subprocess.Popen(command, env=job_env(STANDIN_SECONDS="0.25"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_until(lambda: len(list((out / "_checkpoint").glob("*.parquet"))) >= 1
                          if (out / "_checkpoint").exists() else False, timeout=120)
        # a terminal's Ctrl-C goes to the whole foreground process group: the driver and what it started
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=60)
        log = proc.stdout.read()
    finally:
        wait_gone(proc, timeout=15)
    assert status == 130, log[-4000:]
    assert "Traceback" not in log and "stopped on SIGINT" in log, log[-4000:]
    assert not (out / "_lock").exists()  # the lease was released
    written = pq.read_table(str(out)).num_rows
    assert 0 < written < n

    rerun = subprocess.run(command, env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    keys = pq.read_table(str(out))["key"].to_pylist()
    assert sorted(keys) == sorted(f"img-{i:06d}" for i in range(n))  # every id, exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped_already_done"] == written and summary["processed_this_run"] == n - written

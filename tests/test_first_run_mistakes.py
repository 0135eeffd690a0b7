"""A newcomer's mistakes end in a clear refusal (exit 2, the file or flag named, no traceback) or a clear failure,
and a run that failed before writing data leaves the output as it found it.

CLI refusals run `jobs/*.py` as programs (they must refuse before Ray starts, so they take seconds); the rest runs
the jobs in-process on the session's local Ray (2 CPUs, 2 fake GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import PYTHON, REPO_ROOT, jpeg, job_env, ray_head, write_webdataset_shards
from pipelines import (
    CaptionJobConfig,
    ClusterResourcesError,
    InputError,
    OutputConflictError,
    PaintJobConfig,
    run_caption_job,
    run_paint_job,
)
from pipelines.core.model_cache import check_model_folders
from pipelines.caption.schema import caption_members
from pipelines.core.output import OutputStore
from pipelines.paint.schema import paint_members
from pipelines.core.storage import locate
from testing.synthetic import synthetic_images_table

CAPTION = str(REPO_ROOT / "jobs" / "caption.py")
PAINT = str(REPO_ROOT / "jobs" / "paint.py")
FAST = {"max_new_tokens": 3, "beam_size": 2, "batch_size": 4, "rows_per_file": 4, "decode_batch_size": 4,
        "progress_every_s": 0.5, "actor_start_timeout_s": 60, "no_progress_timeout_s": 60}
RAY_STARTED = "Started a local Ray instance"


def run_cli(script: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, script, *args], env=job_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def refused(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a run that must have been refused: exit 2, no traceback, Ray never started."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert RAY_STARTED not in proc.stderr, "refused only after starting Ray:\n" + proc.stderr
    return proc.stderr


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(synthetic_images_table(6, size=(40, 30)), path)
    return path


# ---- YAML configs ------------------------------------------------------------------------------------------------
def test_yaml_syntax_error_names_file_and_line(tmp_path, images):
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {images}\noutput: [{tmp_path / 'out'}\nbatch_size: 2\n")
    err = refused(run_cli(CAPTION, "--config", str(config), cwd=tmp_path))
    assert f"{config}: line 3" in err and "not valid YAML" in err and "started at line 2" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,line,key", [
    (CAPTION, "batch_size: eight", "batch_size (--batch-size) must be an integer, got 'eight'"),
    (CAPTION, "num_gpus_per_worker: one", "num_gpus_per_worker (--num-gpus-per-worker) must be a number"),
    (CAPTION, "retry_errors: 'yes please'", "retry_errors (--retry-errors) must be true or false"),
    (CAPTION, "keep_columns: {a: 1}", "keep_columns (--keep-columns) must be a list of strings"),
    (PAINT, "images_per_prompt: [2]", "images_per_prompt (--images-per-prompt) must be an integer"),
    (PAINT, "steps: null", "steps (--steps) needs a value, got null"),
])
def test_yaml_value_of_the_wrong_type_names_the_key(tmp_path, script, line, key):
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {tmp_path / 'in'}\noutput: {tmp_path / 'out'}\n{line}\n")
    err = refused(run_cli(script, "--config", str(config), cwd=tmp_path))
    assert str(config) in err and key in err, err


def test_type_errors_are_all_named_at_once():
    with pytest.raises(ValueError) as info:
        CaptionJobConfig.from_mapping({"batch_size": "8", "question": 42, "storage_options": [1]}, source="x.yaml")
    text = str(info.value)
    assert text.startswith("x.yaml: ") and "batch_size" in text and "question" in text and "storage_options" in text
    # right types (ints for floats, comma strings for lists) still load
    config = CaptionJobConfig.from_mapping({"num_gpus_per_worker": 1, "keep_columns": "a,b", "input": "i",
                                            "output": "o"})
    assert config.keep_columns == ["a", "b"] and config.num_gpus_per_worker == 1


# ---- model and component folders: checked on the driver, before Ray ----------------------------------------------
def test_missing_or_incomplete_model_folder_is_refused_before_ray(tmp_path, images):
    missing = refused(run_cli(CAPTION, "--input", str(images), "--output", str(tmp_path / "out"),
                              "--model", str(tmp_path / "no-such-model"), cwd=tmp_path))
    assert f"--model: model folder not found: {tmp_path / 'no-such-model'}" in missing
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    (incomplete / "bee.txt").write_text("x\n")
    err = refused(run_cli(CAPTION, "--input", str(images), "--output", str(tmp_path / "out"),
                          "--model", str(incomplete), cwd=tmp_path))
    assert "--model: no unique checkpoint in" in err
    assert not (tmp_path / "out").exists()


def test_paint_component_folders_are_checked_like_models(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "checker").mkdir()
    (tmp_path / "nsfw").mkdir()
    (tmp_path / "nsfw" / "config.json").write_text("{}")
    err = refused(run_cli(PAINT, "--input", str(prompts), "--output", str(tmp_path / "out"),
                          "--prompt-safety", str(tmp_path / "checker"), "--image-safety", str(tmp_path / "nsfw"),
                          "--rerank", "2", "--reranker", str(tmp_path / "clip"), cwd=tmp_path))
    assert f"--prompt-safety: {tmp_path / 'checker'} has no config.json" in err
    assert f"--image-safety: {tmp_path / 'nsfw'} has no preprocessor_config.json" in err
    assert f"--reranker: component folder not found: {tmp_path / 'clip'}" in err
    assert not (tmp_path / "out").exists()


def test_s3_model_prefix_is_checked_on_the_driver(s3):
    bucket = s3.bucket("models-check")
    s3.client().put_object(Bucket=bucket, Key="chat/bee.txt", Body=b"x\n")
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    with pytest.raises(InputError, match=f"--model: no unique checkpoint in s3://{bucket}/chat "):
        check_model_folders([("--model", f"s3://{bucket}/chat", "chat")], options)
    with pytest.raises(InputError, match=f"--model: model folder not found: s3://{bucket}/nothing-here"):
        check_model_folders([("--model", f"s3://{bucket}/nothing-here/", "chat")], options)
    with pytest.raises(InputError, match="--model: (model folder not found|cannot list)"):
        check_model_folders([("--model", "s3://no-such-bucket-xyz/chat", "chat")], options)
    s3.client().put_object(Bucket=bucket, Key="chat/model.safetensors", Body=b"...")
    check_model_folders([("--model", f"s3://{bucket}/chat", "chat")], options)  # loadable-looking: passes


# ---- GPUs the cluster lacks --------------------------------------------------------------------------------------
def test_gpus_a_local_ray_lacks_are_refused_at_once(ray_session, tmp_path, images):
    config = CaptionJobConfig(input=str(images), output=str(tmp_path / "out"), num_gpus_per_worker=3, **FAST)
    with pytest.raises(ClusterResourcesError, match="asks for 3 GPU .* has 2 GPUs and cannot get more.*"
                                                    "--num-gpus-per-worker 0"):
        run_caption_job(config)
    assert not (tmp_path / "out").exists()


def test_infra_example_yaml_on_a_cpu_only_machine_is_refused_with_exit_2(tmp_path):
    config = tmp_path / "job.yaml"
    example = (REPO_ROOT / "infra" / "caption-job.example.yaml").read_text()
    assert "num_gpus_per_worker: 1" in example
    config.write_text(example)
    samples = [{"__key__": f"s{i}", "jpg": jpeg(), "txt": "What is it?", "json": b"{}"} for i in range(3)]
    write_webdataset_shards(tmp_path / "shards", samples, per_shard=2)
    proc = run_cli(CAPTION, "--config", str(config), "--input", str(tmp_path / "shards"), "--output",
                   str(tmp_path / "out"), "--model", "tiny", "--num-cpus", "2", cwd=tmp_path, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "this local Ray has 0 GPUs and cannot get more" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- a failed run claims nothing ---------------------------------------------------------------------------------
def test_a_run_that_failed_before_writing_leaves_the_output_as_found(ray_session, tmp_path, images):
    broken = tmp_path / "broken-model"  # passes the folder check, fails in the actor: the weights are junk
    broken.mkdir()
    (broken / "bee.txt").write_text("a\nb\n")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises for an actor that cannot start
        run_caption_job(CaptionJobConfig(input=str(images), output=str(out), model=str(broken),
                                         num_gpus_per_worker=0, **FAST))
    assert not out.exists(), list(out.rglob("*"))
    # the corrected command is the same output's first job, not "a different job"
    result = run_caption_job(CaptionJobConfig(input=str(images), output=str(out), model="tiny",
                                              num_gpus_per_worker=0, **FAST))
    assert result.succeeded and result.run == 1 and result.processed == 6


def test_abandoned_run_restores_the_previous_job_file(tmp_path):
    store = OutputStore(locate(str(tmp_path / "out")), "parquet", "caption", caption_members)
    fp = CaptionJobConfig(input="i", output="o").fingerprint()
    store.start_run(fp, "normal")
    before = store.snapshot()
    run = store.start_run(fp, "normal")
    assert store.abandon_run(run, before) and store.snapshot() == before
    fresh = OutputStore(locate(str(tmp_path / "fresh")), "parquet", "caption", caption_members)
    assert fresh.abandon_run(fresh.start_run(fp, "normal"), None) and not (tmp_path / "fresh").exists()


def test_fingerprint_compares_inputs_by_what_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    spellings = ["data", "data/", "./data", str(tmp_path / "data"), str(tmp_path / "data") + "/",
                 f"file://{tmp_path / 'data'}"]
    fingerprints = [CaptionJobConfig(input=s, output="o").fingerprint() for s in spellings]
    assert all(fp == fingerprints[0] for fp in fingerprints)
    assert CaptionJobConfig(input="s3://b/p/", output="o").fingerprint() == \
        CaptionJobConfig(input="s3://b/p", output="o").fingerprint()
    # an output started before fingerprints were canonical (input stored as typed) is still the same job
    store = OutputStore(locate(str(tmp_path / "out")), "parquet", "caption", caption_members)
    store.start_run(fingerprints[0], "normal")
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    job["fingerprint"]["input"] = "data/"
    (tmp_path / "out" / "_job.json").write_text(json.dumps(job))
    (tmp_path / "out" / "_checkpoint").mkdir()
    (tmp_path / "out" / "_checkpoint" / "part-r0001-x.parquet").write_bytes(b"")  # "has data"
    assert store.start_run(CaptionJobConfig(input=str(tmp_path / "data"), output="o").fingerprint(), "normal") == 2


def test_rerun_with_another_spelling_of_the_input_resumes(ray_session, tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_caption_job(CaptionJobConfig(input="in.parquet", output="out", num_gpus_per_worker=0, **FAST))
    again = run_caption_job(CaptionJobConfig(input=str(images), output=str(tmp_path / "out") + "/",
                                             num_gpus_per_worker=0, **FAST))
    assert first.succeeded and again.succeeded and again.skipped == 6 and again.processed == 0


def test_output_of_another_job_kind_is_named_correctly(tmp_path):
    paint = OutputStore(locate(str(tmp_path / "out")), "parquet", "paint", paint_members)
    paint.start_run(PaintJobConfig(input="p.txt", output="o").fingerprint(), "normal")
    (tmp_path / "out" / "_checkpoint").mkdir()
    (tmp_path / "out" / "_checkpoint" / "part-r0001-x.parquet").write_bytes(b"")
    caption = OutputStore(locate(str(tmp_path / "out")), "parquet", "caption", caption_members)
    with pytest.raises(OutputConflictError, match="holds the output of a paint job, not of a caption job"):
        caption.start_run(CaptionJobConfig(input="p.txt", output="o").fingerprint(), "normal")
    # outputs from before the kind was recorded: never "a different caption job" for a paint output
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    del job["job"]
    (tmp_path / "out" / "_job.json").write_text(json.dumps(job))
    with pytest.raises(OutputConflictError) as info:
        caption.start_run(CaptionJobConfig(input="p.txt", output="o").fingerprint(), "normal")
    assert "a different job (of another kind?)" in str(info.value) and "caption job" not in str(info.value)


# ---- a quiet first screen ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_first_screen_has_no_ray_noise_and_no_carriage_returns(tmp_path, images):
    env = job_env()
    env.pop("RAY_AUTH_MODE")  # a newcomer's default: token auth on
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS")
    started = time.monotonic()
    proc = subprocess.run([PYTHON, CAPTION, "--input", str(images), "--output", str(tmp_path / "out"),
                           "--max-new-tokens", "2", "--num-cpus", "2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("constructor arguments in the object store", "Token authentication", "authentication token",
                  "Progress bars disabled", "\r"):
        assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
    assert "caption job done: 6 rows" in proc.stderr and time.monotonic() - started < 240
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert list(summary["actors"]) == ["caption-0"]
    actor = summary["actors"]["caption-0"]
    assert len(actor["actor_id"]) == 32 and actor["rows"] == 6 and 0 < actor["busy_share"] <= 1
    assert os.path.isabs(summary["output"])


@pytest.mark.slow
def test_gpus_a_joined_cluster_lacks_fail_after_the_timeout_with_a_message(tmp_path, images):
    """A cluster the job joins may autoscale: it waits --actor-start-timeout-s, then fails (exit 1) with a
    message, not a traceback, and leaves the output as it found it."""
    env = job_env()
    with ray_head(tmp_path / "head.log", env) as (address, _):
        started = time.monotonic()
        proc = subprocess.run([PYTHON, CAPTION, "--input", str(images), "--output", str(tmp_path / "out"),
                               "--ray-address", address, "--num-gpus-per-worker", "1", "--actor-start-timeout-s", "5",
                               "--max-new-tokens", "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=180)
        waited = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "waiting up to 5 s (--actor-start-timeout-s) for nodes to join" in proc.stderr
    assert "failed: the 1 caption actor(s) did not start within 5 s" in proc.stderr and "0 GPUs" in proc.stderr
    assert waited < 120
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_actor_start_wait_defaults():
    from pipelines.core.runner import ACTOR_LOAD_WAIT_S, NODE_JOIN_WAIT_S, Resources, actor_start_wait

    config = CaptionJobConfig(input="i", output="o")
    gpu = Resources(1, 1.0, 0.0)
    assert NODE_JOIN_WAIT_S < ACTOR_LOAD_WAIT_S == 1800
    # only a cluster the job joined can grow; this test process joined none, so monkeypatching is not needed for
    # the "has them" case and the explicit setting
    assert actor_start_wait(config, gpu, {"GPU": 2.0}, "caption") == ACTOR_LOAD_WAIT_S
    config.actor_start_timeout_s = 7
    assert actor_start_wait(config, gpu, {"GPU": 2.0}, "caption") == 7


# ---- smaller mismatches -------------------------------------------------------------------------------------------
def test_greedy_rows_record_null_for_settings_greedy_ignores(ray_session, tmp_path, images):
    result = run_caption_job(CaptionJobConfig(input=str(images), output=str(tmp_path / "out"), strategy="greedy",
                                              num_gpus_per_worker=0, **FAST))
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert result.succeeded and len(rows) == 6
    for row in rows:
        assert row["strategy"] == "greedy" and row["max_new_tokens"] == 3 and row["repetition_penalty"] == 1.1
        assert row["beam_size"] is None and row["length_penalty"] is None and row["temperature"] is None
        assert row["top_p"] is None and row["seed"] is None


def test_paint_rows_without_checker_and_error_rows_follow_the_readme(ray_session, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"key": "a", "prompt": "a red circle"}\n{"key": "b", "prompt": null}\n'
                       '{"key": "c", "prompt": 7}\n{"key": "d", "prompt": "x", "seed": "soon"}\n')
    out = tmp_path / "out"
    result = run_paint_job(PaintJobConfig(input=str(prompts), output=str(out), output_format="parquet", steps=2,
                                          num_gpus_per_worker=0, actor_start_timeout_s=60, no_progress_timeout_s=60))
    rows = {r["key"]: r for r in pq.read_table(str(out)).to_pylist()}
    assert result.succeeded and rows["a-0"]["status"] == "ok"
    assert rows["a-0"]["prompt_flagged"] is None and rows["a-0"]["prompt_score"] is None  # no checker ran
    assert rows["b-0"]["error_message"] == "input: ValueError: the prompt is null"
    assert rows["c-0"]["error_message"] == "input: TypeError: the prompt must be text, got int"
    assert rows["d-0"]["error_message"] == "input: ValueError: seed 'soon' is not an integer"
    assert rows["d-0"]["seed"] is None

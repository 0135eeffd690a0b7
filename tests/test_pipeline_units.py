"""Pipeline pieces without a Ray job: config (YAML + flags), stages called directly on batches, writers and their
WebDataset output read back with the `webdataset` library, resume bookkeeping (orphans, newest-wins duplicates,
refusals), reconciliation, the model factory (S3 download once per node under a lock), import direction."""

from __future__ import annotations

import argparse
import ast
import json
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import REPO_ROOT, jpeg, read_webdataset_output, tar_member_names
from pipelines.caption import schema as S
from pipelines.core import columns as C
from pipelines.caption.config import CaptionJobConfig
from pipelines.core.config import add_config_arguments, config_from_args, reference_markdown
from pipelines.caption.readers import NormalizeStage, plan_input
from pipelines.core.inputs import InputError
from pipelines.core.stage import KeyFilter
from pipelines.core.output import OutputConflictError, OutputStore, reconcile
from pipelines.core.storage import locate, resolve_storage_options
from pipelines.core.output import WriteStage
from pipelines.core.output.files import CHECKPOINT_DIR, read_index, wds_key
from pipelines.core.output.files import write_data_file as write_file_with_layout
from testing.standins import sleeping_caption_stage


# ---- config ------------------------------------------------------------------------------------------------------
def parse(argv: list[str], yaml_path: Path | None = None) -> CaptionJobConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, CaptionJobConfig)
    return config_from_args(parser.parse_args(argv), yaml_path, CaptionJobConfig)


def test_flags_override_yaml_and_every_field_is_documented(tmp_path):
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text("input: s3://b/in\noutput: s3://b/out\nbatch-size: 4\nkeep_columns: [a, b]\n"
                         "max_new_tokens: 10\nstorage_options: {endpoint_url: 'http://x'}\n")
    config = parse(["--batch-size", "16", "--beam-size", "2"], yaml_path).validate()
    assert (config.batch_size, config.beam_size, config.max_new_tokens) == (16, 2, 10)
    assert config.keep_columns == ["a", "b"] and config.storage_options == {"endpoint_url": "http://x"}
    assert parse(["--input", "x", "--output", "y", "--keep-columns", "a,b", "--retry-errors",
                  "--storage-options", '{"anon": true}']).keep_columns == ["a", "b"]
    from dataclasses import fields

    for f in fields(CaptionJobConfig):
        assert len(f.metadata["help"]) > 15, f.name
        assert f"`--{f.name.replace('_', '-')}`" in reference_markdown(CaptionJobConfig)


def test_example_job_yaml_is_valid():
    config = CaptionJobConfig.from_yaml(REPO_ROOT / "infra" / "caption-job.example.yaml").validate()
    assert config.input_format == "webdataset" and config.keep_columns == ["json"] and config.num_workers == 4
    from pipelines.paint.config import PaintJobConfig

    paint = PaintJobConfig.from_yaml(REPO_ROOT / "infra" / "paint-job.example.yaml").validate()
    assert paint.sampling_kwargs()["height"] == 512 and paint.negative_prompt == "模糊, 低质量" and paint.report


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("inptu: x\n")
    with pytest.raises(ValueError, match=r"unknown keys \['inptu'\]; valid keys: .*'input'"):
        parse([], tmp_path / "bad.yaml")
    with pytest.raises(ValueError) as err:
        CaptionJobConfig(input="", output="o", keep_columns=["caption", "__x"], batch_size=0, beam_size=0).validate()
    text = str(err.value)
    for part in ("--input is required", "'caption' collides", "'__x'", "--batch-size must be >= 1", "beam_size"):
        assert part in text


def test_fingerprint_covers_what_changes_the_output():
    base = CaptionJobConfig(input="i", output="o")
    assert base.fingerprint() == CaptionJobConfig(input="i", output="o2", batch_size=64, num_workers=8).fingerprint()
    assert base.fingerprint() != CaptionJobConfig(input="i", output="o", max_new_tokens=9).fingerprint()
    assert base.fingerprint() != CaptionJobConfig(input="i", output="o", question="why?").fingerprint()
    secret = CaptionJobConfig(input="i", output="o", storage_options={"secret": "s"})
    assert "storage_options" not in secret.public_dict()
    original = CaptionJobConfig(input="i", output="o", preset="original").generation_kwargs()
    assert original["max_new_tokens"] == 514 and original["beam_size"] == 3


def test_default_question_matches_viscpm():
    from viscpm import DEFAULT_QUESTION

    assert CaptionJobConfig().question == DEFAULT_QUESTION


@pytest.mark.parametrize("job", ["caption", "paint"])
def test_readme_reference_is_generated_from_the_config(job):
    from pipelines.paint.config import PaintJobConfig

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    marker = f"<!-- {job}-config-reference -->\n"
    table = reference_markdown(CaptionJobConfig if job == "caption" else PaintJobConfig)
    closing = f"\n<!-- /{job}-config-reference -->"
    assert marker + table + closing in readme, \
        f"README's {job} flag table is stale: paste reference_markdown() between {marker.strip()} and {closing.strip()}"


def test_storage_options_come_from_the_aws_environment():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    opts = resolve_storage_options({"client_kwargs": {"verify": False}}, env)
    assert opts == {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
                    "client_kwargs": {"region_name": "eu-west-1", "verify": False}}
    assert resolve_storage_options({}, {"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"}) == {
        "endpoint_url": "http://a"}


# ---- stages called directly ----------------------------------------------------------------------------------------
def test_normalize_formats_and_key_filter():
    parquet_rows = pa.table({"id": [3, 4], "image": pa.array([b"x", None], pa.binary()), "q": ["why?", None],
                             "src": ["a", "b"]})
    out = NormalizeStage("parquet", "default?", id_column="id", image_column="image", question_column="q",
                         keep_columns=["src"])(parquet_rows)
    assert out[S.KEY].to_pylist() == ["3", "4"] and out[S.QUESTION].to_pylist() == ["why?", "default?"]
    assert out["src"].to_pylist() == ["a", "b"] and out[S.IMAGE].to_pylist() == [b"x", None]

    wds_rows = pa.table({"__key__": ["a", "b"], "png": pa.array([b"p", None], pa.binary()),
                         "txt": pa.array([b"\xe4\xbd\xa0\xe5\xa5\xbd", b""], pa.binary())})
    out = NormalizeStage("webdataset", "d", question_column="txt")(wds_rows).to_pylist()
    assert out[0][S.IMAGE] == b"p" and out[0][S.QUESTION] == "你好" and out[0][S.STATUS] == "ok"
    assert out[1][S.STATUS] == "error" and "no image member" in out[1][S.ERROR] and out[1][S.QUESTION] == "d"

    files = pa.table({"path": ["/data/in/a/b.jpg"], "bytes": pa.array([b"z"], pa.binary())})
    assert NormalizeStage("images", "d", root_path="/data/in")(files)[S.KEY].to_pylist() == ["a/b.jpg"]

    keys = pa.table({S.KEY: ["a", "b", "c"]})
    assert KeyFilter(pa.array(["b"]), keep=True)(keys)[S.KEY].to_pylist() == ["b"]
    assert KeyFilter(pa.array(["b"]), keep=False)(keys)[S.KEY].to_pylist() == ["a", "c"]


def caption_input(n_ok: int, n_err: int = 0) -> pa.Table:
    from pipelines.caption.decode import decode_image

    image = decode_image(jpeg(size=(40, 30)))
    n = n_ok + n_err
    return pa.table({
        S.KEY: [f"k{i}" for i in range(n)], S.QUESTION: ["这是什么？"] * n,
        S.STATUS: ["ok"] * n_ok + ["error"] * n_err, S.ERROR: [None] * n_ok + ["decode: bad"] * n_err,
        S.PIXELS: pa.array([image.tobytes()] * n_ok + [None] * n_err, pa.large_binary()),
        S.WIDTH: pa.array([40] * n_ok + [None] * n_err, pa.int32()),
        S.HEIGHT: pa.array([30] * n_ok + [None] * n_err, pa.int32()),
        "src": [f"s{i}" for i in range(n)],
    })


def test_caption_stage_with_the_tiny_model():
    from pipelines.caption.stage import CaptionStage

    gen = CaptionJobConfig(max_new_tokens=4, beam_size=2).generation_kwargs()
    stage = CaptionStage("tiny", gen, use_gpu=False, model_label="tiny")
    rows = stage(caption_input(3, 1)).to_pylist()
    assert [r[S.STATUS] for r in rows] == ["ok", "ok", "ok", "error"]
    assert all(isinstance(r[S.CAPTION], str) for r in rows[:3]) and rows[3][S.CAPTION] is None
    assert rows[3][S.ERROR] == "decode: bad" and rows[0]["src"] == "s0"
    assert rows[0][S.MODEL] == "tiny" and rows[0]["max_new_tokens"] == 4 and rows[0]["beam_size"] == 2
    # called directly in the test process: "local", or "driver" when the session's Ray is already up
    assert rows[0][C.ACTOR] in ("local", "driver") and rows[0][C.DEVICE] == "cpu"


def test_caption_stage_isolates_a_failing_row():
    stage = sleeping_caption_stage(0)("tiny", CaptionJobConfig().generation_kwargs())

    class Flaky:
        name = "flaky"

        def prepare(self, images, questions):
            return images, questions

        def generate_batch(self, batch, generation=None):
            images, questions = batch
            if len(images) > 1:
                raise RuntimeError("batch failed")
            if questions[0] == "boom":
                raise ValueError("this row is bad")
            return stage_model.generate(images, questions)

    stage_model, stage.model = stage.model, Flaky()
    batch = caption_input(3)
    batch = batch.set_column(1, S.QUESTION, pa.array(["ok", "boom", "ok"]))
    rows = stage(batch).to_pylist()
    assert [r[S.STATUS] for r in rows] == ["ok", "error", "ok"]
    assert rows[1][S.ERROR] == "caption: ValueError: this row is bad"
    assert rows[0][S.CAPTION] == "stand-in caption 40x30"


def test_batch_size_defaults_by_the_actors_device(tmp_path):
    from pipelines import PaintJobConfig
    from pipelines.caption.job import caption_stages
    from pipelines.core.runner import Resources

    assert CaptionJobConfig().batch_size is None
    assert [CaptionJobConfig().model_batch_size(g) for g in (0, 0.5, 1)] == [8, 32, 32]
    assert [PaintJobConfig().model_batch_size(g) for g in (0, 1)] == [4, 8]
    assert CaptionJobConfig(batch_size=3).model_batch_size(1) == 3 and PaintJobConfig(batch_size=2).model_batch_size(0) == 2
    assert "--batch-size must be >= 1" in " ".join(CaptionJobConfig(input="x", output="y", batch_size=0).common_problems())

    pq.write_table(pa.table({"id": ["a"], "image": [jpeg()]}), tmp_path / "in.parquet")
    config = CaptionJobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"))
    plan = plan_input(config, {})
    for gpus, expected in ((1.0, 32), (0.0, 8)):
        specs = caption_stages(plan, config, {}, None, 1, None, Resources(1, gpus, 0))
        model = next(s for s in specs if s.actors)
        assert model.constructor_kwargs["model_batch_size"] == expected and model.batch_size == max(expected, 64)
        assert model.calls_per_actor == 2


def test_model_calls_take_turns_while_the_next_batch_is_prepared(tmp_path):
    """Two calls in flight in one actor (as Ray runs them, in threads): the model never runs two batches at once,
    and one batch's host work happens while the other batch is in the model."""
    record = tmp_path / "calls.jsonl"
    stage = sleeping_caption_stage(0.4, str(record))("tiny", CaptionJobConfig().generation_kwargs())
    outputs: dict[str, list] = {}

    def call(name: str) -> None:
        outputs[name] = stage(caption_input(3)).to_pylist()

    first = threading.Thread(target=call, args=("first",))
    first.start()
    while not record.exists():  # the first batch is prepared: it goes to the model now
        threading.Event().wait(0.01)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    first.join()
    second.join()
    assert all(r[S.STATUS] == "ok" for rows in outputs.values() for r in rows)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    models = sorted((c for c in calls if c["what"] == "model"), key=lambda c: c["start"])
    prepares = [c for c in calls if c["what"] == "prepare"]
    assert len(models) == 2 and len(prepares) == 2
    assert models[0]["end"] <= models[1]["start"]  # one at a time
    late = max(prepares, key=lambda c: c["start"])
    assert models[0]["start"] <= late["start"] and late["end"] <= models[0]["end"]  # prepared during the other call
    assert late["thread"] != models[0]["thread"]
    assert models[0]["thread"] == models[1]["thread"]  # every model call on the actor's one device thread
    # a call's model seconds are its device time (0.4 s), not the wait for the lock (another 0.4 s)
    assert all(0.35 < sum(r[C.MODEL_SECONDS] for r in rows) < 0.7 for rows in outputs.values())


def write_data_file(output, run, table, output_format):
    """A caption-layout data file (+ checkpoint), as the caption job's store writes it."""
    return write_file_with_layout(output, run, table, output_format, S.caption_members)


# ---- writers -------------------------------------------------------------------------------------------------------
def output_rows(keys: list[str], status: str = "ok", caption: str = "一只猫 / a cat", keep: bool = True) -> pa.Table:
    n = len(keys)
    cols = {f.name: pa.nulls(n, f.type) for f in S.BASE_FIELDS}
    cols.update({S.KEY: pa.array(keys, pa.string()), S.STATUS: pa.array([status] * n, pa.string()),
                 S.CAPTION: pa.array([caption if status == "ok" else None] * n, pa.string()),
                 S.ERROR: pa.array([None if status == "ok" else "decode: x"] * n, pa.string())})
    if keep:
        cols["src"] = pa.array([b"\xff\x00"] * n, pa.binary())
    return pa.table(cols)


def test_parquet_and_webdataset_files_round_trip_utf8(tmp_path):
    out = locate(str(tmp_path))
    keys = ["a.jpg", "dir/b.png", "中文.jpg", "%2E"]
    schema = S.output_schema([pa.field("src", pa.binary())])
    p = write_data_file(out, 1, output_rows(keys).cast(schema), "parquet")
    table = pq.read_table(tmp_path / p.name)
    assert sorted(table[S.KEY].to_pylist()) == sorted(keys)
    assert set(table[S.CAPTION].to_pylist()) == {"一只猫 / a cat"}
    assert (tmp_path / CHECKPOINT_DIR / p.name).is_file()
    # same rows -> same file name (a retried write overwrites instead of duplicating)
    assert write_data_file(out, 1, output_rows(list(reversed(keys))).cast(schema), "parquet").name == p.name

    w = write_data_file(out, 1, output_rows(keys).cast(schema), "webdataset")
    assert w.name.endswith(".tar")
    names = tar_member_names((tmp_path / w.name).read_bytes())
    assert "dir/b%2Epng.txt" in names and "%252E.json" in names
    samples = read_webdataset_output([tmp_path / w.name])
    from urllib.parse import unquote

    assert sorted(unquote(s["__key__"]) for s in samples) == sorted(keys)
    for s in samples:
        assert s["txt"] == "一只猫 / a cat" and s["json"][S.KEY] == unquote(s["__key__"])
        assert s["json"]["src"].startswith("base64:")  # non-UTF-8 bytes survive in JSON
    index = read_index((tmp_path / w.name).read_bytes(), "webdataset")
    assert sorted(index[S.KEY].to_pylist()) == sorted(keys)
    assert wds_key("/abs.x") == "%2Fabs%2Ex"


def test_write_stage_reports_stats(tmp_path):
    batch = output_rows(["a", "b"], keep=False)
    batch = pa.concat_tables([batch, output_rows(["c"], status="error", keep=False)])
    n = batch.num_rows
    for name, value in ((C.ACTOR, "actor1"), (C.NODE, "n"), (C.DEVICE, "cpu"), (C.GPU_IDS, "0")):
        batch = batch.append_column(name, pa.array([value] * n))
    for name, value in ((C.MODEL_SECONDS, 0.5), (C.BATCH_START, 10.0), (C.BATCH_END, 11.5)):
        batch = batch.append_column(name, pa.array([value] * n))
    store = OutputStore(locate(str(tmp_path)), "parquet", "caption", S.caption_members)
    stats = WriteStage(store, 3, S.output_schema())(batch).to_pylist()[0]
    assert (stats["rows"], stats["ok"], stats["error"]) == (3, 2, 1) and stats["file"].startswith("part-r0003-")
    actor = json.loads(stats["actors"])["actor1"]
    assert actor["rows"] == 3 and actor["model_s"] == 1.5 and actor["batches"] == 1 and actor["gpu_ids"] == "0"


# ---- resume bookkeeping ----------------------------------------------------------------------------------------
def test_start_run_refuses_other_jobs_and_foreign_files(tmp_path):
    store = OutputStore(locate(str(tmp_path / "out")), "parquet", "caption", S.caption_members)
    fp = CaptionJobConfig(input="i", output="o").fingerprint()
    assert store.start_run(fp, "normal") == 1
    assert store.start_run(fp, "normal") == 2
    other = CaptionJobConfig(input="i", output="o", model="/models/other").fingerprint()
    assert store.start_run(other, "normal") == 1  # runs that wrote no data bind nothing
    assert store.start_run(fp, "normal") == 1
    write_data_file(store.location, 1, output_rows(["a"], keep=False), "parquet")
    with pytest.raises(OutputConflictError, match=r"different caption job \(differs in model: 'tiny' -> "):
        store.start_run(other, "normal")
    assert store.start_run(other, "normal", overwrite=True) == 1
    assert store.data_files() == [] and store.checkpoint_files() == []
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflictError, match="not part of a caption job: 'notes.txt'"):
        store.start_run(other, "normal")
    lone = OutputStore(locate(str(tmp_path / "lone")), "parquet", "caption", S.caption_members)
    write_data_file(lone.location, 1, output_rows(["a"], keep=False), "parquet")
    with pytest.raises(OutputConflictError, match="no _job.json"):
        lone.start_run(fp, "normal")


def test_incomplete_writes_are_cleaned_and_duplicates_resolve_to_the_newest(tmp_path):
    store = OutputStore(locate(str(tmp_path)), "parquet", "caption", S.caption_members)
    old = write_data_file(store.location, 1, output_rows(["a", "b", "c"], status="error", keep=False), "parquet")
    new = write_data_file(store.location, 2, output_rows(["b"], keep=False), "parquet")
    orphan = write_data_file(store.location, 2, output_rows(["x"], keep=False), "parquet")
    (tmp_path / CHECKPOINT_DIR / orphan.name).unlink()  # killed between data file and checkpoint
    (tmp_path / CHECKPOINT_DIR / "part-r0001-0000000000000000.parquet").write_bytes(b"")  # checkpoint, no data
    (tmp_path / "_tmp-123").write_bytes(b"half")
    assert store.clean_incomplete() == {"incomplete_data_files": 1, "orphan_checkpoints": 1, "temp_files": 1}
    assert sorted(store.data_files()) == sorted([old.name, new.name])

    assert store.resolve_duplicates(run=3) == 1
    index = store.data_index()
    rows = {r[S.KEY]: r for r in index.to_pylist()}
    assert sorted(rows) == ["a", "b", "c"] and rows["b"][S.STATUS] == "ok" and rows["b"]["file"] == new.name
    assert old.name not in store.data_files()  # rewritten as a run-3 file without "b"
    assert store.resolve_duplicates(run=3) == 0


def test_duplicate_resolution_converges_after_a_crash_midway(tmp_path):
    """Crash after the rewritten file is complete but before the old one is deleted: the next start cleans up."""
    store = OutputStore(locate(str(tmp_path)), "webdataset", "caption", S.caption_members)
    old = write_data_file(store.location, 1, output_rows(["a", "b"], status="error", keep=False), "webdataset")
    write_data_file(store.location, 2, output_rows(["a"], keep=False), "webdataset")
    write_data_file(store.location, 2, output_rows(["b"], status="error", keep=False), "webdataset")  # rewritten
    assert old.name in store.data_files()  # ... and the crash left the old file
    store.resolve_duplicates(run=3)
    index = store.data_index()
    assert sorted(index[S.KEY].to_pylist()) == ["a", "b"]
    assert {r[S.KEY]: r[S.STATUS] for r in index.to_pylist()} == {"a": "ok", "b": "error"}


def test_reconcile_lists_missing_duplicated_and_unexpected_ids():
    index = pa.table({S.KEY: ["a", "b", "b", "z"], S.STATUS: ["ok", "ok", "error", "ok"]})
    r = reconcile(pa.array(["a", "b", "c", "d"]), index)
    assert not r.ok and r.missing == ["c", "d"] and r.duplicated == ["b"] and r.unexpected == ["z"]
    text = " ".join(r.problems())
    assert "2 input ids are missing from the output: 'c', 'd'" in text and "'b'" in text and "'z'" in text
    assert reconcile(pa.array(["a"]), pa.table({S.KEY: ["a"], S.STATUS: ["ok"]})).ok


def test_counts_are_by_status_so_blocked_is_neither_ok_nor_error():
    from pipelines.core.runner import format_statuses

    index = pa.table({S.KEY: ["a", "b", "c", "d"], S.STATUS: ["ok", "blocked", "error", "ok"]})
    r = reconcile(pa.array(["a", "b", "c", "d"]), index)
    assert r.ok and r.statuses == {"ok": 2, "blocked": 1, "error": 1} and (r.ok_rows, r.error_rows) == (2, 1)
    assert r.to_dict()["statuses"] == {"ok": 2, "blocked": 1, "error": 1}
    assert format_statuses(r.statuses) == "2 ok, 1 blocked, 1 error"
    assert format_statuses({}) == "0 ok, 0 error"


# ---- input planning ---------------------------------------------------------------------------------------------
def test_input_problems_stop_before_any_work(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 2], "img": pa.array([b"x"] * 3, pa.binary())}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"missing column\(s\) \['image'\].*Available columns: \['id', 'img'\]"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o"))
    with pytest.raises(InputError, match="1 ids occur more than once .*'2'"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", image_column="img"))
    pq.write_table(pa.table({"id": [1, None], "img": pa.array([b"x"] * 2, pa.binary())}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="1 rows have no id"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", image_column="img"))
    with pytest.raises(InputError, match="no .tar shards"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", input_format="webdataset"))


def test_webdataset_plan_reads_keys_from_tar_headers(tmp_path):
    from pipeline_fixtures import write_webdataset_shards

    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg(), "txt": "q"} for i in range(7)]
    write_webdataset_shards(tmp_path / "shards", samples, per_shard=3)
    (tmp_path / "shards" / "_ignored.tar").write_bytes(b"")
    plan = plan_input(CaptionJobConfig(input=str(tmp_path / "shards"), output="o", input_format="webdataset"))
    assert len(plan.files) == 3 and plan.keys.to_pylist() == [f"s{i:03d}" for i in range(7)]


# ---- model factory ----------------------------------------------------------------------------------------------
def test_s3_model_is_downloaded_once_per_node_then_loaded(s3, tmp_path):
    import torch

    from pipelines.caption.stage import load_caption_model
    from pipelines.core.model_cache import fetch_model_folder
    from viscpm import ChatModel, GenerationConfig
    from viscpm.tokenizer import synthetic_vocab

    tiny = ChatModel.from_pretrained("tiny")
    folder = tmp_path / "chat-model"
    folder.mkdir()
    torch.save(tiny.original_state_dict(), folder / "viscpm_chat_balance_checkpoint.pt")
    (folder / "bee.txt").write_text("\n".join(synthetic_vocab()), encoding="utf-8")
    (folder / "viscpm_config.json").write_text(json.dumps(tiny.config.to_dict()))
    fs = s3.fs()
    s3.bucket("models-bucket")
    fs.put(str(folder), "models-bucket/chat/", recursive=True)
    uri = "s3://models-bucket/chat/chat-model"
    opts = resolve_storage_options()
    cache = tmp_path / "cache"

    # count downloads on the very filesystem object fetch_model_folder gets: fsspec caches instances, and an
    # instance made earlier in the session carries its own sync methods, so patching the class would miss it
    from pipelines.core.storage import locate

    remote_fs = locate(uri, opts).fs
    calls = []
    original_get = remote_fs.get_file
    had_own = "get_file" in vars(remote_fs)

    def counting_get(*a, **k):
        calls.append(a[0])
        return original_get(*a, **k)

    remote_fs.get_file = counting_get
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(fetch_model_folder(uri, opts, cache)))
                   for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        if had_own:  # restore exactly what the instance had
            remote_fs.get_file = original_get
        else:
            del remote_fs.get_file
    assert len(set(results)) == 1 and len(calls) == 3  # three files, downloaded once for four callers
    model = load_caption_model(uri, storage_options=opts, cache_dir=str(cache))
    assert model.name == "chat-model"
    from pipelines.caption.decode import decode_image

    images = [decode_image(jpeg())]
    gen = GenerationConfig(max_new_tokens=4)
    assert model.answer(images, ["q"], generation=gen) == tiny.answer(images, ["q"], generation=gen)


# ---- imports go one way -------------------------------------------------------------------------------------------
def _imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_imports_go_one_way_and_only_jobs_configure_logging():
    assert "jobs" not in _imports(REPO_ROOT / "pipelines")
    assert not {"jobs", "pipelines"} & _imports(REPO_ROOT / "viscpm")
    for path in (REPO_ROOT / "pipelines").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "basicConfig" not in text and not re.search(r"(?<![\w.])print\(", text), path

"""The caption job end to end on the session's local Ray (2 CPUs, 2 fake GPUs): local Parquet with bad images,
S3 (moto on loopback) WebDataset in and out, an image folder with --retry-errors, image paths in Parquet, two
actors pinned to different (fake) GPUs, and the refusals."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import bad_and_odd_images, jpeg, read_webdataset_output, write_webdataset_shards
from pipelines import CaptionJobConfig, OutputConflictError, run_caption_job
from pipelines.caption import schema as S
from testing.standins import sleeping_caption_stage
from testing.synthetic import synthetic_images_table

FAST = {"max_new_tokens": 4, "beam_size": 2, "batch_size": 4, "rows_per_file": 8, "decode_batch_size": 4,
        "progress_every_s": 0.5, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(str(folder))  # pyarrow skips `_`-prefixed names: data files only


def test_parquet_job_with_bad_images_then_rerun_and_refusals(ray_session, tmp_path):
    bad = bad_and_odd_images()
    good = synthetic_images_table(12, size=(96, 64))
    table = pa.table({"id": list(bad) + good["id"].to_pylist(),
                      "image": pa.concat_arrays([pa.array([v[0] for v in bad.values()], pa.binary()),
                                                 good["image"].combine_chunks()]),
                      "note": [f"备注 {i}" for i in range(len(bad) + 12)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=10)
    config = CaptionJobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model="tiny",
                              question="这张图片里有什么？ What is in it?", keep_columns=["note"],
                              num_gpus_per_worker=0, **FAST)
    result = run_caption_job(config)
    assert result.succeeded, result.reconciliation.problems()
    out = read_output(tmp_path / "out")
    assert out.schema.names == [*S.OUTPUT_COLUMNS, "note"]
    assert sorted(out[S.KEY].to_pylist()) == sorted(table["id"].to_pylist())  # each id exactly once
    rows = {r[S.KEY]: r for r in out.to_pylist()}
    for key, (_, expected_error) in bad.items():
        assert (rows[key][S.STATUS] == "ok") == (expected_error is None), (key, rows[key][S.ERROR])
        if expected_error:
            assert expected_error.lower() in rows[key][S.ERROR].lower() and rows[key][S.CAPTION] is None
    ok = [r for r in rows.values() if r[S.STATUS] == "ok"]
    assert all(isinstance(r[S.CAPTION], str) and r[S.ERROR] is None for r in ok)
    assert {r[S.QUESTION] for r in rows.values()} == {config.question}
    assert rows["img-000003"]["note"] == "备注 16" and rows["ok-jpeg"][S.MODEL] == "tiny"
    assert rows["ok-jpeg"]["max_new_tokens"] == 4 and rows["ok-jpeg"]["strategy"] == "beam"
    assert result.ok + result.error == len(rows) and result.error == 6
    summary = (tmp_path / "out" / "_summary.json").read_text()
    assert '"succeeded": true' in summary and "storage_options" not in summary

    again = run_caption_job(config)  # a finished job: nothing to do, reconciled again
    assert again.succeeded and again.processed == 0 and again.skipped == len(rows) and again.run == 2
    assert read_output(tmp_path / "out").num_rows == len(rows)

    with pytest.raises(OutputConflictError, match="differs in question"):
        run_caption_job(CaptionJobConfig(**{**config.__dict__, "question": "other?"}))


def test_two_actors_pinned_to_different_fake_gpus(ray_session, tmp_path):
    pq.write_table(synthetic_images_table(48, size=(32, 32)), tmp_path / "in.parquet")
    result = run_caption_job(CaptionJobConfig(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), num_workers=2,
        **{**FAST, "batch_size": 2}), model_stage=sleeping_caption_stage(0.1))  # GPUs per worker default to 1: the session Ray has 2 (fake) GPUs
    assert result.succeeded and result.processed == 48
    assert len(result.actors) == 2
    assert sorted(a["gpu_ids"] for a in result.actors.values()) == ["0", "1"]
    assert {a["device"] for a in result.actors.values()} == {"cpu"}  # no CUDA here: fell back to CPU
    assert all(a["rows"] > 0 for a in result.actors.values())


def test_an_actor_prepares_the_next_batch_while_its_model_runs(ray_session, tmp_path):
    """Ray runs two calls of the caption actor at once (threads): batches take turns in the model, and a batch is
    prepared while the previous one is in it."""
    import json

    pq.write_table(synthetic_images_table(24, size=(64, 48)), tmp_path / "in.parquet")
    record = tmp_path / "calls.jsonl"
    result = run_caption_job(CaptionJobConfig(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), num_workers=1, num_gpus_per_worker=0,
        **FAST), model_stage=sleeping_caption_stage(0.3, str(record)))
    assert result.succeeded and result.processed == 24
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    models = sorted((c for c in calls if c["what"] == "model"), key=lambda c: c["start"])
    assert len(models) >= 6 and len({c["pid"] for c in calls}) == 1  # batches of <= 4 rows (blocks may split)
    assert all(a["end"] <= b["start"] for a, b in zip(models, models[1:]))  # one batch in the model at a time
    assert len({c["thread"] for c in calls}) >= 2 and len({m["thread"] for m in models}) == 1  # one device thread
    overlapped = [p for p in calls if p["what"] == "prepare"
                  if any(m["start"] < p["start"] and p["end"] < m["end"] and m["thread"] != p["thread"]
                         for m in models)]
    assert overlapped, "no batch was prepared while another was in the model"


def test_s3_webdataset_in_and_out(ray_session, s3, tmp_path):
    bucket = s3.bucket("wds-bucket")
    samples = [{"__key__": f"sample{i:03d}", "jpg": jpeg(colour=(i * 20, 10, 10)),
                "txt": f"第{i}张图是什么颜色？"} for i in range(9)]
    samples.append({"__key__": "no-image", "txt": "where is the picture?"})
    shards = write_webdataset_shards(tmp_path / "shards", samples, per_shard=4)
    fs = s3.fs()
    for shard in shards:
        fs.put_file(str(shard), f"{bucket}/corpus/shards/{shard.name}")
    config = CaptionJobConfig(input=f"s3://{bucket}/corpus/shards", input_format="webdataset",
                              question_column="txt", keep_columns=["txt"], output=f"s3://{bucket}/captions/run1",
                              output_format="webdataset", model="tiny", num_gpus_per_worker=0, **FAST)
    result = run_caption_job(config)
    assert result.succeeded, result.reconciliation.problems()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/captions/run1"))
    assert "_summary.json" in names and "_job.json" in names and "_checkpoint" in names
    tars = [n for n in names if n.endswith(".tar")]
    assert tars and all(n.startswith("part-r0001-") for n in tars)
    local = tmp_path / "back"
    local.mkdir()
    for name in tars:
        fs.get_file(f"{bucket}/captions/run1/{name}", str(local / name))
    back = read_webdataset_output(sorted(local.glob("*.tar")))
    assert sorted(unquote(s["__key__"]) for s in back) == sorted(s["__key__"] for s in samples)
    by_key = {s["json"][S.KEY]: s for s in back}
    assert by_key["sample003"]["json"][S.QUESTION] == "第3张图是什么颜色？"
    assert by_key["sample003"]["json"]["txt"] == "第3张图是什么颜色？"
    assert by_key["sample003"]["txt"] == by_key["sample003"]["json"][S.CAPTION]
    assert by_key["no-image"]["json"][S.STATUS] == "error" and by_key["no-image"]["txt"] == ""
    assert "no image member" in by_key["no-image"]["json"][S.ERROR]


def test_s3_image_folder_and_parquet_with_s3_paths(ray_session, s3, tmp_path):
    """Images under an S3 prefix (ids = relative keys), and Parquet on S3 whose column holds s3:// URIs."""
    bucket = s3.bucket("img-bucket")
    fs = s3.fs()
    for name in ("a/one.jpg", "a/b/two.png", "three.jpeg"):
        fs.pipe_file(f"{bucket}/photos/{name}", jpeg(colour=(len(name) * 9, 0, 0)))
    config = CaptionJobConfig(input=f"s3://{bucket}/photos/", input_format="images",
                              output=f"s3://{bucket}/out-images", **FAST)
    result = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert result.succeeded and result.ok == 3
    with fs.open(f"{bucket}/out-images/" + next(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/out-images")
                                                if p.endswith(".parquet")), "rb") as fh:
        keys = sorted(pq.read_table(fh)[S.KEY].to_pylist())
    assert keys == ["a/b/two.png", "a/one.jpg", "three.jpeg"]

    table = pa.table({"id": ["x", "y"], "uri": [f"s3://{bucket}/photos/a/one.jpg", f"s3://{bucket}/nope.jpg"]})
    with fs.open(f"{bucket}/rows/part-0.parquet", "wb") as fh:
        pq.write_table(table, fh)
    result = run_caption_job(CaptionJobConfig(input=f"s3://{bucket}/rows", image_column="uri",
                                              output=str(tmp_path / "out"), **FAST),
                             model_stage=sleeping_caption_stage(0))
    rows = {r[S.KEY]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert result.succeeded and rows["x"][S.STATUS] == "ok" and rows["y"][S.STATUS] == "error"
    assert "FileNotFoundError" in rows["y"][S.ERROR]


def test_image_folder_retry_errors(ray_session, tmp_path):
    folder = tmp_path / "photos"
    (folder / "trip" / "day1").mkdir(parents=True)
    for i in range(5):
        (folder / "trip" / "day1" / f"p{i}.jpg").write_bytes(jpeg(colour=(i * 40, 90, 90)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "readme.txt").write_text("not an image: skipped by extension")
    (folder / "_hidden.jpg").write_bytes(jpeg())
    config = CaptionJobConfig(input=str(folder), input_format="images", output=str(tmp_path / "out"), model="tiny",
                              num_gpus_per_worker=0, **FAST)
    first = run_caption_job(config)
    assert first.succeeded and (first.ok, first.error) == (5, 1)
    keys = sorted(read_output(tmp_path / "out")[S.KEY].to_pylist())
    assert keys == ["broken.png"] + [f"trip/day1/p{i}.jpg" for i in range(5)]

    (folder / "broken.png").write_bytes(jpeg(colour=(1, 2, 3)))  # the image was fixed at the source
    assert run_caption_job(config).processed == 0  # a plain rerun keeps error rows: they are done
    retry = run_caption_job(CaptionJobConfig(**{**config.__dict__, "retry_errors": True}))
    assert retry.succeeded and retry.processed == 1 and retry.ok == 1
    out = read_output(tmp_path / "out")
    assert sorted(out[S.KEY].to_pylist()) == keys  # still each id exactly once
    assert pc.all(pc.equal(out[S.STATUS], "ok")).as_py()
    again = run_caption_job(CaptionJobConfig(**{**config.__dict__, "retry_errors": True}))
    assert again.processed == 0 and again.succeeded


def test_parquet_image_paths_relative_and_absolute(ray_session, tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "elsewhere.jpg").write_bytes(jpeg(colour=(0, 0, 200)))
    pq.write_table(pa.table({"uid": [10, 20, 30], "path": ["img/a.jpg", str(tmp_path / "elsewhere.jpg"),
                                                          "img/missing.jpg"]}), tmp_path / "data" / "rows.parquet")
    result = run_caption_job(CaptionJobConfig(input=str(tmp_path / "data"), image_column="path", id_column="uid",
                                              output=str(tmp_path / "out"), **FAST),
                             model_stage=sleeping_caption_stage(0))
    rows = {r[S.KEY]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert result.succeeded and sorted(rows) == ["10", "20", "30"]
    assert rows["10"][S.CAPTION] == "stand-in caption 64x48" and rows["20"][S.STATUS] == "ok"
    assert rows["30"][S.STATUS] == "error" and "FileNotFoundError" in rows["30"][S.ERROR]

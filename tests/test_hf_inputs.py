"""HuggingFace `datasets` Parquet as caption input (issue 20): an image column of the `datasets.Image` feature
(struct<bytes, path>: the bytes, else the path), no id column (ids derived from file and row, stable across reruns),
and `--keep-columns source=name` so that img2dataset's `caption` column can be kept. Every input file here is
written by the real `datasets` library."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from PIL import Image

from pipeline_fixtures import png as png_of
from pipelines import CaptionJobConfig, InputError, run_caption_job
from pipelines.caption import schema as S
from pipelines.caption.readers import (DERIVED_ID, IMAGE_STRUCT, NormalizeStage, ParquetRows, normalize_stage,
                                       plan_input)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import shapes_data as D  # noqa: E402

JOB = {"actor_start_timeout_s": 120, "no_progress_timeout_s": 120, "progress_every_s": 5.0}


def hf_parquet(path: Path, columns: dict, batch_size: int | None = None) -> Path:
    """A Parquet file as `datasets` writes one: `image` cast to the Image feature (struct<bytes, path>)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    ds.to_parquet(str(path), **({"batch_size": batch_size} if batch_size else {}))
    return path


def png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return png_of(Image.new("RGB", (16, 12), colour))


def image_cell(data: bytes | None = None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


# ---- plan -----------------------------------------------------------------------------------------------------------
def test_datasets_parquet_plans_with_derived_ids_and_the_struct_image(tmp_path, caplog):
    hf_parquet(tmp_path / "in" / "train-00000.parquet", {"image": [image_cell(png()), image_cell(png())],
                                                         "text": ["x", "y"]})
    hf_parquet(tmp_path / "in" / "more" / "train-00001.parquet", {"image": [image_cell(png())], "text": ["z"]})
    assert pq.read_schema(tmp_path / "in" / "train-00000.parquet").field("image").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())])  # what `datasets` writes
    config = CaptionJobConfig(input=str(tmp_path / "in"), output="o", keep_columns=["text"])
    with caplog.at_level(logging.INFO, logger="pipelines.caption.readers"):
        plan = plan_input(config)
    assert plan.keys.to_pylist() == ["more/train-00001.parquet#0", "train-00000.parquet#0", "train-00000.parquet#1"]
    assert plan.id_column is None and plan.image_kind == IMAGE_STRUCT
    assert "ids are derived from the input file and row" in caplog.text
    # the same input planned again: the same ids (resume and --incremental depend on it)
    assert plan_input(config).keys.equals(plan.keys)
    # a single file: its name is still part of the id
    single = plan_input(CaptionJobConfig(input=str(tmp_path / "in" / "more" / "train-00001.parquet"), output="o"))
    assert single.keys.to_pylist() == ["train-00001.parquet#0"]


def test_id_column_named_or_present_is_used_and_a_named_missing_one_is_refused(tmp_path):
    hf_parquet(tmp_path / "a.parquet", {"image": [image_cell(png())], "id": [7], "uid": ["u7"]})
    assert plan_input(CaptionJobConfig(input=str(tmp_path), output="o")).keys.to_pylist() == ["7"]
    assert plan_input(CaptionJobConfig(input=str(tmp_path), output="o", id_column="uid")).keys.to_pylist() == ["u7"]
    with pytest.raises(InputError, match=r"a\.parquet: missing column\(s\) \['nope'\].*Available columns"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", id_column="nope"))
    # explicit --id-column id on a file without it: refused, never derived
    hf_parquet(tmp_path / "b.parquet", {"image": [image_cell(png())]})
    with pytest.raises(InputError, match=r"b\.parquet: missing column\(s\) \['id'\]"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", id_column="id"))
    # without it: one file with `id`, one without - neither reading nor deriving fits the whole input
    with pytest.raises(InputError, match=r"a\.parquet has it, .*b\.parquet does not"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o"))


def test_image_column_kinds_must_agree_across_files(tmp_path):
    hf_parquet(tmp_path / "a.parquet", {"image": [image_cell(png())]})
    pq.write_table(pa.table({"image": pa.array([png()], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"different kinds.*struct<bytes, path>.*a\.parquet.*image bytes.*b\.parquet"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o"))
    pq.write_table(pa.table({"image": pa.array([{"w": 1}])}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"type struct<w: int64> in .*b\.parquet.*HuggingFace"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o"))


def test_struct_image_is_read_from_bytes_else_from_path():
    struct = pa.array([image_cell(b"B0", "ignored.png"), image_cell(None, "rel/x.png"), image_cell(None, None), None],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    batch = pa.table({DERIVED_ID: [f"f.parquet#{i}" for i in range(4)], "image": struct})
    stage = NormalizeStage("parquet", "q?", id_column=None, image_column="image", image_kind=IMAGE_STRUCT)
    out = stage(batch)
    assert out[S.KEY].to_pylist() == ["f.parquet#0", "f.parquet#1", "f.parquet#2", "f.parquet#3"]
    assert out[S.IMAGE].to_pylist() == [b"B0", None, None, None]
    assert out[S.IMAGE_PATH].to_pylist() == [None, "rel/x.png", None, None]


def test_parquet_rows_numbers_rows_across_row_groups_and_blocks(ray_session, tmp_path):
    # ray_session: building a Ray datasource starts a default Ray when none runs (the session's has fake GPUs)
    n = 600  # more rows than one block (PARQUET_BLOCK_ROWS) and several row groups (batch_size=70)
    path = hf_parquet(tmp_path / "big.parquet", {"image": [image_cell(str(i).encode()) for i in range(n)],
                                                 "n": list(range(n))}, batch_size=70)
    assert pq.ParquetFile(path).num_row_groups > 1
    plan = plan_input(CaptionJobConfig(input=str(path), output="o", keep_columns=["n"]))
    source = ParquetRows([str(path)], {str(path): "big.parquet"}, plan.read_schema)
    with pa.OSFile(str(path)) as fh:
        blocks = list(source._read_stream(fh, str(path)))
    assert len(blocks) > 1
    table = pa.concat_tables(blocks)
    assert table[DERIVED_ID].to_pylist() == [f"big.parquet#{i}" for i in range(n)]
    assert table["n"].to_pylist() == list(range(n))
    assert [v["bytes"] for v in table["image"].to_pylist()] == [str(i).encode() for i in range(n)]
    assert table[DERIVED_ID].to_pylist() == plan.keys.to_pylist()


# ---- --keep-columns renames -----------------------------------------------------------------------------------------
def test_keep_columns_rename_and_collisions(tmp_path):
    with pytest.raises(ValueError, match=r"--keep-columns 'caption'.*collides with the output column 'caption'.*"
                                         r"caption=<new name>"):
        CaptionJobConfig(input="i", output="o", keep_columns=["caption"]).validate()
    with pytest.raises(ValueError, match=r"writes an output column twice"):
        CaptionJobConfig(input="i", output="o", keep_columns=["url", "caption=url"]).validate()
    with pytest.raises(ValueError, match=r"--keep-columns 'caption=status'.*collides with the output column 'status'"):
        CaptionJobConfig(input="i", output="o", keep_columns=["caption=status"]).validate()
    with pytest.raises(ValueError, match=r"--keep-columns 'caption=': expected NAME or SOURCE=OUTPUT_NAME"):
        CaptionJobConfig(input="i", output="o", keep_columns="caption=").validate()
    config = CaptionJobConfig(input="i", output="o", keep_columns="caption=alt_text,url").validate()
    assert config.keep_columns == ["caption=alt_text", "url"]
    from_yaml = CaptionJobConfig.from_mapping({"input": "i", "output": "o",
                                               "keep_columns": ["caption=alt_text", "url"]})
    assert from_yaml.validate().keep_columns == config.keep_columns and from_yaml.fingerprint() == config.fingerprint()
    # img2dataset-style rows: the source `caption` is read, written as `alt_text`
    pq.write_table(pa.table({"key": ["000000001"], "jpg": pa.array([png()], pa.binary()), "caption": ["a cat"],
                             "url": ["http://x/1.jpg"]}), tmp_path / "00000.parquet")
    config = CaptionJobConfig(input=str(tmp_path), output="o", id_column="key", image_column="jpg",
                              keep_columns=["caption=alt_text", "url"])
    plan = plan_input(config)
    assert [(f.name, f.type) for f in plan.keep_fields] == [("alt_text", pa.string()), ("url", pa.string())]
    out = normalize_stage(plan, config)(pq.read_table(tmp_path / "00000.parquet"))
    assert out["alt_text"].to_pylist() == ["a cat"] and "caption" not in out.column_names
    with pytest.raises(InputError, match=r"--keep-columns 'alt'.*in none"):
        plan_input(CaptionJobConfig(input=str(tmp_path), output="o", id_column="key", image_column="jpg",
                                    keep_columns=["alt=x"]))


# ---- end to end: the `shapes` model on the session's local Ray -------------------------------------------------------
def test_datasets_parquet_captioned_end_to_end_and_resumed(ray_session, tmp_path, monkeypatch):
    """Two `datasets`-written files without an id column, one row's image given by a relative path only (bytes null),
    an img2dataset-style `caption` column kept as `alt_text`: captioned by `shapes`; then a data file is deleted from
    the output and the same command fills exactly its rows in again (derived ids are the same on the rerun)."""
    rng = random.Random(2020)
    pictures = [D.sample_file(rng) for _ in range(10)]
    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    (corpus / "images" / "p9.img").write_bytes(pictures[9][1])  # read through the struct's path
    cells = [image_cell(b) for _, b in pictures[:9]] + [image_cell(None, "images/p9.img")]
    alt = [f"source caption {i}" for i in range(10)]
    monkeypatch.chdir(corpus)  # `datasets` looks at the file a relative path names (for its size) from here
    hf_parquet(corpus / "part-0.parquet", {"image": cells[:6], "caption": alt[:6]})
    hf_parquet(corpus / "part-1.parquet", {"image": cells[6:], "caption": alt[6:]})
    assert pq.read_table(corpus / "part-1.parquet")["image"].to_pylist()[3] == image_cell(None, "images/p9.img")
    output = tmp_path / "out"
    config = CaptionJobConfig(input=str(corpus), output=str(output), model="shapes", question=D.QUESTION["en"],
                              keep_columns=["caption=alt_text"], max_new_tokens=16, batch_size=8,
                              decode_batch_size=8, rows_per_file=4, num_gpus_per_worker=0, report=True, **JOB)
    result = run_caption_job(config)
    assert result.succeeded and result.ok == 10, result.reconciliation.problems()
    # the contact sheet finds every row's picture by its derived id: from the struct's bytes, or its path
    sheet = (output / "_report.html").read_text(encoding="utf-8")
    assert sheet.count('<img src="data:image/') == 10 and "part-1.parquet#3" in sheet
    expected_keys = [f"part-0.parquet#{i}" for i in range(6)] + [f"part-1.parquet#{i}" for i in range(4)]
    rows = {r[S.KEY]: r for r in pq.read_table(str(output)).to_pylist()}
    assert sorted(rows) == sorted(expected_keys)
    texts = [rows[k][S.CAPTION] for k in expected_keys]
    right = [D.parse_caption(t) == ("en", label.colour, label.shape) for (label, _), t in zip(pictures, texts)]
    assert sum(right) >= 9 and right[9], list(zip([str(label) for label, _ in pictures], texts))
    assert [rows[k]["alt_text"] for k in expected_keys] == alt

    # resume: lose one data file (and its checkpoint); the rerun must process exactly its rows
    data_files = sorted(output.glob("part-*.parquet"))
    lost = data_files[0]
    lost_keys = set(pq.read_table(lost)[S.KEY].to_pylist())
    lost.unlink()
    (output / "_checkpoint" / lost.name).unlink()
    again = run_caption_job(config)
    assert again.succeeded and again.processed == len(lost_keys), again.reconciliation.problems()
    rows_again = {r[S.KEY]: r for r in pq.read_table(str(output)).to_pylist()}
    assert sorted(rows_again) == sorted(expected_keys)
    assert {k: rows_again[k][S.CAPTION] for k in lost_keys} == {k: rows[k][S.CAPTION] for k in lost_keys}


def test_derived_ids_on_s3(ray_session, s3, tmp_path):
    """The row-numbering read on S3 (paths as Ray hands them back for an fsspec filesystem), stand-in model."""
    from testing.standins import sleeping_caption_stage

    local = hf_parquet(tmp_path / "train-00000.parquet", {"image": [image_cell(png()) for _ in range(3)]})
    bucket = s3.bucket("hf-derived-ids")
    s3.fs().put_file(str(local), f"{bucket}/hf/data/train-00000.parquet")
    config = CaptionJobConfig(input=f"s3://{bucket}/hf/", output=f"s3://{bucket}/out", max_new_tokens=4,
                              batch_size=4, decode_batch_size=4, **JOB)
    result = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert result.succeeded and result.ok == 3, result.reconciliation.problems()
    fs = s3.fs()
    keys = sorted(k for f in fs.glob(f"{bucket}/out/part-*.parquet")
                  for k in pq.read_table(f, filesystem=fs)[S.KEY].to_pylist())
    assert keys == [f"data/train-00000.parquet#{i}" for i in range(3)]


def test_derived_ids_with_incremental(ray_session, tmp_path):
    """--incremental: each input file is its own input, so its rows' ids are `<name>.parquet#<row>`; a second run
    after one more file lands processes that file only, and the ids of the first stay as they were."""
    from testing.standins import sleeping_caption_stage

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    hf_parquet(corpus / "train-00000.parquet", {"image": [image_cell(png()) for _ in range(2)]})
    config = CaptionJobConfig(input=str(corpus), output=str(out), incremental=True, max_new_tokens=4,
                              batch_size=4, decode_batch_size=4, **JOB)
    first = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert first.succeeded and first.processed == 2
    hf_parquet(corpus / "train-00001.parquet", {"image": [image_cell(png())]})
    second = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert second.succeeded and second.processed == 1 and second.files["unchanged"] == 1
    assert pq.read_table(out / "train-00000.parquet")[S.KEY].to_pylist() == [
        "train-00000.parquet#0", "train-00000.parquet#1"]
    assert pq.read_table(out / "train-00001.parquet")[S.KEY].to_pylist() == ["train-00001.parquet#0"]

"""The output's dataset card (`.huggingface.yaml`): real job outputs (caption and paint, Parquet and WebDataset,
normal, resumed and `--incremental`) read back by the real Hugging Face `datasets` loader give exactly the data rows;
pyarrow and Ray Data still read the output folders as before; the card states what the output holds."""

from __future__ import annotations

import calendar
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_fixtures import jpeg, write_webdataset_shards
from pipelines import CaptionJobConfig, PaintJobConfig, run_caption_job, run_paint_job
from pipelines.caption.job import card_layout
from pipelines.core.output import OutputStore
from pipelines.core.output.card import CardLayout, data_file_patterns, features, write_card
from pipelines.core.output.store import CARD_FILE
from pipelines.core.storage import locate
from testing.standins import sleeping_caption_stage

FAST = {"max_new_tokens": 4, "beam_size": 2, "batch_size": 4, "rows_per_file": 3, "decode_batch_size": 4,
        "num_gpus_per_worker": 0, "progress_every_s": 0.5, "actor_start_timeout_s": 120,
        "no_progress_timeout_s": 120}


def hf_rows(folder: Path, tmp_path: Path) -> list[dict]:
    """`datasets.load_dataset(<folder>)`: the one split, as decoded rows (images as PIL images)."""
    import datasets

    datasets.disable_progress_bars()
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
    assert list(loaded) == ["train"]
    return list(loaded["train"])


def card_of(folder: Path) -> dict:
    return yaml.safe_load((folder / CARD_FILE).read_text(encoding="utf-8"))


def assert_recent(card: dict) -> None:
    updated = calendar.timegm(time.strptime(card["viscpm_batch"]["updated"], "%Y-%m-%dT%H:%M:%SZ"))  # UTC
    assert abs(updated - time.time()) < 600, card["viscpm_batch"]["updated"]


def images_parquet(path: Path, ids: list[str]) -> None:
    images = [b"not an image" if i.startswith("bad") else jpeg(colour=(30 * n % 255, 90, 200))
              for n, i in enumerate(ids)]
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), path)


def test_caption_parquet_card_readers_and_resume(ray_session, tmp_path):
    src = tmp_path / "in.parquet"
    images_parquet(src, ["bad-0", "img-1", "img-2", "img-3"])
    out = tmp_path / "out"
    config = CaptionJobConfig(input=str(src), output=str(out), model="shapes", question="图片里有什么？", **FAST)
    first = run_caption_job(config)
    assert first.succeeded and first.reconciliation.statuses == {"ok": 3, "error": 1}

    card = card_of(out)
    facts = card["viscpm_batch"]
    assert (facts["job"], facts["mode"], facts["model"], facts["rows"], facts["run"]) == ("caption", "normal",
                                                                                        "shapes", 4, 1)
    assert facts["statuses"] == {"error": 1, "ok": 3} and facts["complete"] is True
    assert facts["settings"]["question"] == "图片里有什么？" and facts["settings"]["generation"]["beam_size"] == 2
    assert card["configs"][0]["data_files"] == [{"split": "train", "path": ["part-r*.parquet"]}]
    assert [f["name"] for f in card["dataset_info"]["features"]][:3] == ["key", "caption", "status"]
    assert_recent(card)

    rows = hf_rows(out, tmp_path)
    assert sorted(r["key"] for r in rows) == ["bad-0", "img-1", "img-2", "img-3"]  # no checkpoint or json rows
    assert {r["key"]: r["status"] for r in rows}["bad-0"] == "error"
    assert all(r["caption"] and "一个" in r["caption"] for r in rows if r["status"] == "ok")
    # readers that skip `_`/`.` names see the data files only, as before the card
    assert pq.read_table(str(out)).num_rows == 4
    assert pds.dataset(str(out), format="parquet").count_rows() == 4  # Spark's rule: every file not `_`/`.`
    import ray.data

    assert ray.data.read_parquet(str(out)).count() == 4

    # a resumed run (the input grew; same job): only the new ids, and the card counts the whole output
    images_parquet(src, ["bad-0", "img-1", "img-2", "img-3", "img-4", "img-5"])
    second = run_caption_job(config)
    assert second.succeeded and second.processed == 2 and second.skipped == 4
    facts = card_of(out)["viscpm_batch"]
    assert (facts["rows"], facts["run"], facts["statuses"]) == (6, 2, {"error": 1, "ok": 5})
    assert sorted(r["key"] for r in hf_rows(out, tmp_path)) == ["bad-0", *(f"img-{i}" for i in range(1, 6))]
    assert pq.read_table(str(out)).num_rows == 6

    # the card is ours: not a foreign entry, and --overwrite deletes it with the other bookkeeping
    store = OutputStore(locate(str(out)), "parquet", "caption", lambda row: [])
    assert store.foreign_entries() == []
    store.delete_job_files()
    assert not (out / CARD_FILE).exists() and not list(out.glob("part-*"))


def test_caption_webdataset_card_with_error_rows_first(ray_session, tmp_path):
    """The loader infers WebDataset features from the first samples; a first sample that is an error (null caption)
    would type the caption as null. The declared features keep every row."""
    src = tmp_path / "in.parquet"
    images_parquet(src, ["bad-a", "bad-b", "img-c", "img-d", "img-e"])
    out = tmp_path / "out"
    result = run_caption_job(CaptionJobConfig(input=str(src), output=str(out), output_format="webdataset",
                                              model="tiny", **FAST), model_stage=sleeping_caption_stage(0))
    assert result.succeeded and result.reconciliation.statuses == {"ok": 3, "error": 2}
    rows = hf_rows(out, tmp_path)
    assert sorted(unquote(r["__key__"]) for r in rows) == ["bad-a", "bad-b", "img-c", "img-d", "img-e"]
    by_key = {r["json"]["key"]: r for r in rows}
    assert by_key["bad-a"]["json"]["caption"] is None and by_key["bad-a"]["txt"] == ""
    assert by_key["img-c"]["txt"] == by_key["img-c"]["json"]["caption"] == "stand-in caption 64x48"
    assert card_of(out)["viscpm_batch"]["rows"] == 5
    import ray.data

    assert ray.data.read_webdataset(str(out), decoder=None).count() == 5  # the card is no shard to Ray either


def test_paint_outputs_card_parquet_and_webdataset(ray_session, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n一个蓝色的方形\n", encoding="utf-8")
    for fmt in ("parquet", "webdataset"):
        out = tmp_path / fmt
        result = run_paint_job(PaintJobConfig(input=str(prompts), output=str(out), output_format=fmt, steps=2,
                                              scheduler="dpmsolver", num_gpus_per_worker=0,
                                              actor_start_timeout_s=120, no_progress_timeout_s=120))
        assert result.succeeded and result.ok == 2
        facts = card_of(out)["viscpm_batch"]
        assert (facts["job"], facts["rows"], facts["settings"]["steps"]) == ("paint", 2, 2)
        rows = hf_rows(out, tmp_path)
        image = "image" if fmt == "parquet" else "png"
        meta = [r if fmt == "parquet" else r["json"] for r in rows]
        assert sorted(m["prompt"] for m in meta) == ["a red circle", "一个蓝色的方形"]
        assert all(r[image].size == (64, 64) for r in rows)  # declared as images: the loader decodes them
    assert pq.read_table(str(tmp_path / "parquet")).num_rows == 2


def test_incremental_card_follows_the_manifest(ray_session, tmp_path):
    shards = tmp_path / "shards"
    samples = [{"__key__": f"s{i:02d}", "jpg": jpeg(colour=(i * 20, 0, 0))} for i in range(6)]
    write_webdataset_shards(shards, samples[:2], 2)
    write_webdataset_shards(shards / "sub", samples[2:4], 2)
    out = tmp_path / "out"
    config = CaptionJobConfig(input=str(shards), input_format="webdataset", output=str(out), incremental=True,
                              model="tiny", **FAST)
    first = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert first.succeeded and first.files["new"] == 2
    card = card_of(out)
    assert card["configs"][0]["data_files"][0]["path"] == ["*.parquet", "sub/*.parquet"]
    assert (card["viscpm_batch"]["mode"], card["viscpm_batch"]["rows"]) == ("incremental", 4)
    assert sorted(r["key"] for r in hf_rows(out, tmp_path)) == ["s00", "s01", "s02", "s03"]

    write_webdataset_shards(shards / "sub" / "new", samples[4:], 2)
    second = run_caption_job(config, model_stage=sleeping_caption_stage(0))
    assert second.succeeded and (second.files["new"], second.files["unchanged"]) == (1, 2)
    card = card_of(out)
    assert card["configs"][0]["data_files"][0]["path"] == ["*.parquet", "sub/*.parquet", "sub/new/*.parquet"]
    assert (card["viscpm_batch"]["run"], card["viscpm_batch"]["rows"]) == (2, 6)
    assert sorted(r["key"] for r in hf_rows(out, tmp_path)) == [f"s{i:02d}" for i in range(6)]
    nothing = run_caption_job(config, model_stage=sleeping_caption_stage(0))  # a no-op run rewrites it too
    assert nothing.processed == 0 and card_of(out)["viscpm_batch"]["run"] == 3
    assert card_of(out)["dataset_info"] == card["dataset_info"]


def test_card_on_s3(ray_session, s3, tmp_path):
    """On S3 the card is written beside the data (one PUT) and sums the sizes the listing gives."""
    bucket = s3.bucket("card-bucket")
    fs = s3.fs()
    src = tmp_path / "in.parquet"
    images_parquet(src, ["img-1", "img-2"])
    result = run_caption_job(CaptionJobConfig(input=str(src), output=f"s3://{bucket}/caps", model="tiny", **FAST),
                             model_stage=sleeping_caption_stage(0))
    assert result.succeeded
    card = yaml.safe_load(fs.cat_file(f"{bucket}/caps/{CARD_FILE}").decode("utf-8"))
    parts = [p for p in fs.ls(f"{bucket}/caps", detail=True, refresh=True) if p["name"].endswith(".parquet")]
    assert parts and card["dataset_info"]["download_size"] == sum(p["size"] for p in parts)
    assert card["viscpm_batch"]["rows"] == 2


def test_features_map_and_fall_back() -> None:
    plain = card_layout([pa.field("extra", pa.binary())])
    parquet = features(plain, "parquet")
    assert parquet is not None and parquet[-1] == {"name": "extra", "dtype": "binary"}
    wds = features(plain, "webdataset")
    assert wds is not None and [f["name"] for f in wds] == ["txt", "json", "__key__", "__url__"]
    assert wds[1]["struct"][-1] == {"name": "extra", "dtype": "string"}  # bytes travel as text in the json member
    nested = CardLayout(pa.schema([pa.field("key", pa.string()), pa.field("tags", pa.list_(pa.string()))]))
    assert features(nested, "parquet") is None  # the loader infers them (exact for Parquet)
    assert data_file_patterns("webdataset") == ["part-r*.tar"]
    assert data_file_patterns("parquet", ["b/x.parquet", "a.parquet", "b/y.parquet", "we[ird]/z.parquet"]) == [
        "*.parquet", "b/*.parquet", "we[[]ird]/*.parquet"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the loader never reaches for the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")



def test_a_card_without_layout_keeps_the_features_it_had(tmp_path) -> None:
    """An --incremental caption run with --keep-columns that planned no input file cannot know the columns' types:
    the card keeps the features of the run that did; the counts and date are new."""
    location = locate(str(tmp_path))
    common = {"job": "caption", "output_format": "parquet", "mode": "incremental", "model": "tiny", "settings": {},
              "complete": True, "outputs": ["a.parquet"]}
    layout = card_layout([pa.field("extra", pa.int16())])
    write_card(location, run=1, rows=2, statuses={"ok": 2}, layout=layout, data_bytes=10, **common)
    first = card_of(tmp_path)
    write_card(location, run=2, rows=3, statuses={"ok": 3}, layout=None, data_bytes=12, **common)
    second = card_of(tmp_path)
    assert second["dataset_info"]["features"] == first["dataset_info"]["features"] == features(layout, "parquet")
    assert second["dataset_info"]["download_size"] == 12 and second["viscpm_batch"]["rows"] == 3

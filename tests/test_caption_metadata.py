"""The caption output's image metadata (`width`, `height`, `sha256`, `image_flagged`) end to end on the session's
local Ray, in both output formats, on good and bad images; `--image-safety` loads the real (tiny) checker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_fixtures import bad_and_odd_images, read_webdataset_output
from pipelines import CaptionJobConfig, run_caption_job
from pipelines.caption import schema as S
from testing.standins import sleeping_caption_stage

FAST = {"batch_size": 4, "rows_per_file": 8, "decode_batch_size": 4, "num_gpus_per_worker": 0,
        "progress_every_s": 0.5, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}
PICK = ("ok-jpeg", "truncated", "null", "random-bytes", "png-bomb", "exif-rotated", "16-bit", "cmyk")


def corpus(tmp_path: Path) -> tuple[Path, dict]:
    items = {k: v for k, v in bad_and_odd_images().items() if k in PICK}
    table = pa.table({"id": list(items), "image": pa.array([v[0] for v in items.values()], pa.binary())})
    pq.write_table(table, tmp_path / "in.parquet")
    return tmp_path / "in.parquet", items


def stored_size(data: bytes) -> tuple[int, int]:
    from PIL import ImageOps

    with Image.open(__import__("io").BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).size


def check_rows(rows: list[dict], items: dict, flagged: bool | None) -> None:
    assert sorted(r[S.KEY] for r in rows) == sorted(items)
    for row in rows:
        data, expected_error = items[row[S.KEY]]
        assert row[S.SHA256] == (hashlib.sha256(data).hexdigest() if data else None), row[S.KEY]
        if expected_error is None:
            assert row[S.STATUS] == "ok", row
            assert (row[S.IMAGE_WIDTH], row[S.IMAGE_HEIGHT]) == stored_size(data)
            assert row[S.IMAGE_FLAGGED] is flagged
        else:
            assert row[S.STATUS] == "error"
            assert row[S.IMAGE_WIDTH] is None and row[S.IMAGE_HEIGHT] is None and row[S.IMAGE_FLAGGED] is None
    assert next(r for r in rows if r[S.KEY] == "exif-rotated")[S.IMAGE_WIDTH] == 20  # 40x20 stored, shown 20x40


def test_parquet_output_with_the_image_safety_checker(ray_session, tmp_path):
    pytest.importorskip("transformers")
    from safety_fixtures import build_image_checker_folder, flag_only

    from viscpm.safety import ImageSafetyChecker

    folder = build_image_checker_folder(tmp_path / "checker")
    checker = ImageSafetyChecker.from_folder(folder)
    flag_only(checker, None)  # every image is flagged: the verdict must reach the output
    checker.model.save_pretrained(folder)
    source, items = corpus(tmp_path)
    config = CaptionJobConfig(input=str(source), output=str(tmp_path / "out"), model="tiny", max_new_tokens=2,
                              beam_size=1, strategy="greedy", image_safety=str(folder), **FAST)
    result = run_caption_job(config)
    assert result.succeeded
    out = pq.read_table(str(tmp_path / "out"))
    assert out.schema.field(S.IMAGE_WIDTH).type == pa.int32() and out.schema.field(S.SHA256).type == pa.string()
    assert out.schema.field(S.IMAGE_FLAGGED).type == pa.bool_()
    rows = out.to_pylist()
    check_rows(rows, items, flagged=True)
    assert all(isinstance(r[S.CAPTION], str) for r in rows if r[S.STATUS] == "ok")  # flagged images still captioned


def test_webdataset_json_without_the_checker(ray_session, tmp_path):
    source, items = corpus(tmp_path)
    config = CaptionJobConfig(input=str(source), output=str(tmp_path / "out"), output_format="webdataset", **FAST)
    assert run_caption_job(config, model_stage=sleeping_caption_stage(0.0)).succeeded
    samples = read_webdataset_output(sorted((tmp_path / "out").glob("part-*.tar")))
    rows = [s["json"] if isinstance(s["json"], dict) else json.loads(s["json"]) for s in samples]
    check_rows(rows, items, flagged=None)


def test_image_safety_folder_is_checked_on_the_driver(tmp_path):
    from pipelines import InputError

    source, _ = corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    config = CaptionJobConfig(input=str(source), output=str(tmp_path / "out"), image_safety=str(tmp_path / "empty"))
    assert ("--image-safety", str(tmp_path / "empty"), "image-safety") in config.model_sources()
    with pytest.raises(InputError, match="--image-safety"):
        run_caption_job(config)
    assert not (tmp_path / "out").exists()

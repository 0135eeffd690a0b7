"""The caption job's decode tasks resize to the model's input size, learned on the driver without loading weights:
the size lookup (`tiny`, `shapes`, local converted and original folders, an s3:// prefix), the wiring (not with an
image safety checker), and one job run showing identical captions with the decode-side resize on and off."""

from __future__ import annotations

import io
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from PIL import Image
from ray import cloudpickle

from pipelines import CaptionJobConfig, run_caption_job
from pipelines.caption import schema as S
from pipelines.caption.decode import DecodeStage
from pipelines.caption.job import caption_stages
from pipelines.caption.readers import plan_input
from pipelines.caption.stage import CaptionStage
from pipelines.core.model_cache import read_model_config
from pipelines.core.output.store import OutputStore
from pipelines.core.runner import Resources
from pipelines.core.storage import locate
from viscpm import ChatModel, chat_image_size
from viscpm.folders import BUNDLED_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import shapes_data as D  # noqa: E402

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

SHAPES_CHAT = BUNDLED_DIR / "shapes" / "chat"
JOB = {"max_new_tokens": 8, "batch_size": 4, "decode_batch_size": 4, "rows_per_file": 8, "num_gpus_per_worker": 0,
       "progress_every_s": 0.5, "actor_start_timeout_s": 120, "no_progress_timeout_s": 120}


class ThumbnailCaptionStage(CaptionStage):
    """The caption stage as before the decode-side resize: the model's size unknown, the decode tasks ship the
    --max-image-side thumbnail and the model resizes it."""

    @classmethod
    def input_image_size(cls, model: str, storage_options: Any = None) -> int | None:
        return None


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import this test module


def original_folder(folder: Path) -> Path:
    """An original VisCPM-Chat folder: bee.txt and the checkpoint, no viscpm_config.json. The lookup never opens
    the weights, so a placeholder stands in for the 10B checkpoint."""
    folder.mkdir(parents=True)
    shutil.copy(SHAPES_CHAT / "bee.txt", folder / "bee.txt")
    (folder / "viscpm_chat_balance_checkpoint.pt").write_bytes(b"never read")
    return folder


def test_local_sizes_match_what_the_loader_builds(tmp_path):
    assert chat_image_size("tiny") == ChatModel.tiny().config.image_size == 224
    assert chat_image_size("shapes") == 64
    converted = Path(shutil.copytree(SHAPES_CHAT, tmp_path / "converted"))
    assert chat_image_size(converted) == ChatModel.from_pretrained(converted).config.image_size == 64
    assert chat_image_size(original_folder(tmp_path / "original")) == 224  # the real model's
    assert CaptionStage.input_image_size(str(converted)) == 64
    assert CaptionStage.input_image_size(str(tmp_path / "missing")) is None  # unknown: the model resizes


def test_s3_prefix_size_is_read_from_its_config(s3, tmp_path):
    bucket = s3.bucket("model-sizes")
    client = s3.client()
    for path in SHAPES_CHAT.iterdir():
        client.put_object(Bucket=bucket, Key=f"shapes/{path.name}", Body=path.read_bytes())
    for path in original_folder(tmp_path / "original").iterdir():
        client.put_object(Bucket=bucket, Key=f"original/{path.name}", Body=path.read_bytes())
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    assert read_model_config(f"s3://{bucket}/shapes/", options)["image_size"] == 64
    assert CaptionStage.input_image_size(f"s3://{bucket}/shapes", options) == 64
    assert read_model_config(f"s3://{bucket}/original", options) is None
    assert CaptionStage.input_image_size(f"s3://{bucket}/original", options) == 224


def shape_pictures(tmp_path: Path) -> Path:
    """Shape pictures at sizes that take every path: a JPEG decoded in draft mode, odd aspect ratios, smaller than
    the model's 64 px, grayscale and with transparency."""
    rng = random.Random(41)
    images = {}
    for i, (size, fmt) in enumerate([((1200, 900), "JPEG"), ((900, 120), "JPEG"), ((40, 300), "PNG"),
                                     ((50, 40), "PNG"), ((480, 480), "PNG"), ((320, 200), "JPEG")]):
        _, image = D.sample(rng, size)
        buf = io.BytesIO()
        image.save(buf, fmt, quality=90)
        images[f"{fmt.lower()}-{i}"] = buf.getvalue()
    _, image = D.sample(rng, (200, 150))
    images["grayscale"] = encode_png(image.convert("L"))
    image.putalpha(Image.new("L", image.size, 200))
    images["rgba"] = encode_png(image)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(images), "image": pa.array(list(images.values()), pa.binary())}), path)
    return path


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def decode_stage_of(config: CaptionJobConfig, model_stage: type[CaptionStage] = CaptionStage) -> DecodeStage:
    plan = plan_input(config, {})
    store = OutputStore(locate(config.output), config.output_format, "caption", S.caption_members)
    specs = caption_stages(plan, config, {}, store, 1, None, Resources(1, 0.0, 1.0), model_stage)
    return next(spec.fn for spec in specs if isinstance(spec.fn, DecodeStage))


def decoded(stage: DecodeStage, path: Path) -> dict[str, dict]:
    table = pq.read_table(path)
    n = table.num_rows
    batch = pa.table({S.KEY: table["id"], S.QUESTION: ["q"] * n, S.STATUS: [S.STATUS_OK] * n,
                      S.ERROR: pa.nulls(n, pa.string()), S.IMAGE: table["image"].cast(pa.large_binary()),
                      S.IMAGE_PATH: pa.nulls(n, pa.string())})
    return {row[S.KEY]: row for row in stage(batch).to_pylist()}


def test_caption_job_captions_are_the_same_with_the_decode_side_resize(ray_session, tmp_path):
    path = shape_pictures(tmp_path)
    on = CaptionJobConfig(input=str(path), output=str(tmp_path / "on"), model="shapes", **JOB)
    off = CaptionJobConfig(**{**on.__dict__, "output": str(tmp_path / "off")})

    # what the decode tasks ship: (64, 64) with the model's size known, the thumbnail otherwise or with a checker
    sized, thumbs = decode_stage_of(on), decode_stage_of(off, ThumbnailCaptionStage)
    assert (sized.size, thumbs.size) == (64, None)
    assert decode_stage_of(CaptionJobConfig(**{**on.__dict__, "image_safety": str(tmp_path / "checker")})).size is None
    small, big = decoded(sized, path), decoded(thumbs, path)
    assert all((r[S.WIDTH], r[S.HEIGHT]) == (64, 64) and len(r[S.PIXELS]) == 64 * 64 * 3 for r in small.values())
    assert max(big["jpeg-0"][S.WIDTH], big["jpeg-0"][S.HEIGHT]) == 448
    # 98,304 bytes instead of 1,548,336 (the 50x40 picture alone grows: it ships at the model's size too)
    assert sum(len(r[S.PIXELS]) for r in small.values()) * 10 < sum(len(r[S.PIXELS]) for r in big.values())

    assert run_caption_job(on).succeeded
    assert run_caption_job(off, model_stage=ThumbnailCaptionStage).succeeded
    fields = (S.STATUS, S.CAPTION, S.FINISHED, S.IMAGE_WIDTH, S.IMAGE_HEIGHT, S.SHA256)
    rows_on = {r[S.KEY]: [r[f] for f in fields] for r in pq.read_table(str(tmp_path / "on")).to_pylist()}
    rows_off = {r[S.KEY]: [r[f] for f in fields] for r in pq.read_table(str(tmp_path / "off")).to_pylist()}
    assert rows_on == rows_off and len(rows_on) == 8
    assert all(row[0] == S.STATUS_OK and row[1] for row in rows_on.values())

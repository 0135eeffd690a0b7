"""Decode stage, called directly on pyarrow batches (no Ray): bad images become error rows, odd ones become RGB."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pytest
from PIL import Image

from pipeline_fixtures import bad_and_odd_images, exif_rotated_jpeg, jpeg, png, png_with_size
from pipelines.caption import schema as S
from pipelines.caption.decode import DecodeError, DecodeStage, decode_image, pixels_to_image
from pipelines.core.stage import StageInputError

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels


def decode_batch(items: dict, **kwargs) -> pa.Table:
    n = len(items)
    batch = pa.table({
        S.KEY: list(items), S.QUESTION: ["q"] * n, S.STATUS: [S.STATUS_OK] * n, S.ERROR: pa.nulls(n, pa.string()),
        S.IMAGE: pa.array([v[0] for v in items.values()], pa.large_binary()), S.IMAGE_PATH: pa.nulls(n, pa.string()),
    })
    return DecodeStage(**kwargs)(batch)


def test_bad_images_become_error_rows_and_odd_modes_become_rgb():
    items = bad_and_odd_images()
    out = decode_batch(items)
    assert out.column_names == [S.KEY, S.QUESTION, S.STATUS, S.ERROR, S.PIXELS, S.WIDTH, S.HEIGHT,
                                S.IMAGE_WIDTH, S.IMAGE_HEIGHT, S.SHA256]
    for row in out.to_pylist():
        data, expected_error = items[row[S.KEY]]
        # the digest of the bytes as given, whether they decode or not; null when there were none
        assert row[S.SHA256] == (hashlib.sha256(data).hexdigest() if data else None), row[S.KEY]
        if expected_error is None:
            assert row[S.STATUS] == S.STATUS_OK, row
            assert row[S.ERROR] is None
            image = pixels_to_image(row[S.PIXELS], row[S.WIDTH], row[S.HEIGHT])
            assert image.mode == "RGB" and len(row[S.PIXELS]) == row[S.WIDTH] * row[S.HEIGHT] * 3
            assert (row[S.IMAGE_WIDTH], row[S.IMAGE_HEIGHT]) == (row[S.WIDTH], row[S.HEIGHT])  # all below 448
        else:
            assert row[S.STATUS] == S.STATUS_ERROR, row[S.KEY]
            assert row[S.PIXELS] is None
            assert row[S.IMAGE_WIDTH] is None and row[S.IMAGE_HEIGHT] is None
            assert row[S.ERROR].startswith("decode: "), row[S.ERROR]
            assert expected_error.lower() in row[S.ERROR].lower(), (row[S.KEY], row[S.ERROR])


def test_mode_conversions_keep_the_picture():
    cmyk = decode_image(jpeg(mode="CMYK", colour=(0, 255, 255, 0)))
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta + yellow full -> red
    sixteen = decode_image(png(Image.new("I;16", (20, 10), 40000)))
    assert sixteen.getpixel((0, 0)) == (156, 156, 156)  # rescaled 40000/257, not clipped to white
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] * 256)
    assert decode_image(png(palette, transparency=0)).getpixel((1, 1)) == (255, 255, 255)  # transparent -> white


def test_exif_orientation_first_frame_and_downscale():
    assert decode_image(exif_rotated_jpeg()).size == (20, 40)
    from pipeline_fixtures import animated_gif

    assert decode_image(animated_gif()).getpixel((0, 0)) == decode_image(animated_gif()).getpixel((0, 0))
    big = jpeg(size=(3000, 1000), colour=(10, 20, 30))
    small = decode_image(big, max_side=448)
    assert max(small.size) == 448 and small.size[0] == 448
    assert decode_image(big, max_side=0).size == (3000, 1000)


def test_jpeg_draft_mode_decodes_less():
    """Draft mode decodes a big JPEG at 1/2..1/8 scale - the intermediate image is already small."""
    import io

    image = Image.open(io.BytesIO(jpeg(size=(4000, 3000))))
    image.draft(None, (448, 448))
    assert image.size == (1000, 750)  # scale 4: still >= 448 on both sides


def test_bomb_limit_is_configurable_and_restored():
    with pytest.raises(Image.DecompressionBombError):
        decode_image(png_with_size(50_000, 50_000))
    with pytest.raises(DecodeError, match="null"):
        decode_image(None)
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombWarning):
        decode_image(jpeg(size=(100, 100)), max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == saved
    assert decode_image(jpeg(size=(100, 100)), max_pixels=20000).size == (100, 100)


def test_paths_are_read_and_missing_files_are_row_errors(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    n = 3
    batch = pa.table({
        S.KEY: ["a", "b", "c"], S.QUESTION: ["q"] * n, S.STATUS: [S.STATUS_OK, S.STATUS_OK, S.STATUS_ERROR],
        S.ERROR: [None, None, "normalize: earlier"], S.IMAGE: pa.nulls(n, pa.large_binary()),
        S.IMAGE_PATH: ["a.jpg", str(tmp_path / "missing.jpg"), None],
    })
    rows = DecodeStage(input_root=str(tmp_path))(batch).to_pylist()
    assert rows[0][S.STATUS] == S.STATUS_OK and (rows[0][S.WIDTH], rows[0][S.HEIGHT]) == (64, 48)
    assert rows[1][S.STATUS] == S.STATUS_ERROR and "FileNotFoundError" in rows[1][S.ERROR]
    assert rows[2][S.ERROR] == "normalize: earlier"  # upstream errors pass through untouched


def test_missing_columns_name_the_stage_and_what_is_there():
    with pytest.raises(StageInputError, match=r"stage 'decode' is missing input columns: '__image'.*Available"):
        DecodeStage()(pa.table({S.KEY: ["a"], S.STATUS: ["ok"], S.ERROR: [None], S.IMAGE_PATH: [None]}))


def test_width_height_are_the_stored_size_after_exif_orientation_before_the_downscale():
    rotated = Image.new("RGB", (1600, 900), (10, 200, 10))  # shown as 900x1600 (EXIF orientation 6)
    exif = rotated.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif)
    items = {"big-rotated": (buf.getvalue(), None), "big-png": (png(Image.new("RGB", (1000, 500))), None),
             "exif-small": (exif_rotated_jpeg(), None)}
    rows = {r[S.KEY]: r for r in decode_batch(items, max_side=448).to_pylist()}
    # JPEG draft mode and the thumbnail shrink the pixels; width/height keep the image's own size
    assert (rows["big-rotated"][S.IMAGE_WIDTH], rows["big-rotated"][S.IMAGE_HEIGHT]) == (900, 1600)
    assert max(rows["big-rotated"][S.WIDTH], rows["big-rotated"][S.HEIGHT]) == 448
    assert rows["big-rotated"][S.HEIGHT] > rows["big-rotated"][S.WIDTH]
    assert (rows["big-png"][S.IMAGE_WIDTH], rows["big-png"][S.IMAGE_HEIGHT]) == (1000, 500)
    assert (rows["big-png"][S.WIDTH], rows["big-png"][S.HEIGHT]) == (448, 224)
    assert (rows["exif-small"][S.IMAGE_WIDTH], rows["exif-small"][S.IMAGE_HEIGHT]) == (20, 40)


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour fields plus grain: resampling differences show (a flat image would hide them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 13, (size[1], size[0], 3))
    image = Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + grain, 0, 255).astype(np.uint8))
    if mode == "RGBA":  # a transparent band: composited on white before any resize
        alpha = Image.new("L", size, 255)
        alpha.paste(0, (0, 0, size[0], size[1] // 3))
        image.putalpha(alpha)
        return image
    return image.convert(mode)


def model_size_cases() -> dict:
    rotated = photo((900, 500))
    exif = rotated.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif)
    return {
        "jpeg-draft-4:3": (jpeg_of(photo((2000, 1500))), None),  # draft mode decodes it at 1000x750
        "jpeg-wide": (jpeg_of(photo((1800, 240))), None),
        "png-tall": (png(photo((37, 500))), None),
        "png-below-64": (png(photo((30, 20))), None),
        "png-square-448": (png(photo((448, 448))), None),
        "grayscale": (png(photo((300, 120), "L")), None),
        "rgba": (png(photo((260, 400), "RGBA")), None),
        "cmyk-jpeg": (jpeg_of(photo((500, 333), "CMYK")), None),
        "exif-rotated-jpeg": (buf.getvalue(), None),
        "not-an-image": (b"junk", "not an image"),
    }


def jpeg_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [224, 64])
def test_model_size_pixels_are_what_the_model_made_from_the_thumbnail(size):
    """Decode tasks resizing to the model's input size change nothing the model sees: its preprocessing of the
    shipped (size, size) image equals, bit for bit, its preprocessing of today's 448 thumbnail."""
    import torch

    from viscpm.image import preprocess_images

    items = model_size_cases()
    thumbs = decode_batch(items, max_side=448).to_pylist()
    sized = decode_batch(items, max_side=448, size=size).to_pylist()
    for thumb, row in zip(thumbs, sized):
        for column in (S.KEY, S.STATUS, S.ERROR, S.IMAGE_WIDTH, S.IMAGE_HEIGHT, S.SHA256):
            assert row[column] == thumb[column], (row[S.KEY], column)
        if row[S.STATUS] != S.STATUS_OK:
            assert row[S.PIXELS] is None
            continue
        assert (row[S.WIDTH], row[S.HEIGHT]) == (size, size) and len(row[S.PIXELS]) == size * size * 3
        before = preprocess_images([pixels_to_image(thumb[S.PIXELS], thumb[S.WIDTH], thumb[S.HEIGHT])], size)
        after = preprocess_images([pixels_to_image(row[S.PIXELS], row[S.WIDTH], row[S.HEIGHT])], size)
        assert torch.equal(before, after), row[S.KEY]
    assert max(thumbs[0][S.WIDTH], thumbs[0][S.HEIGHT]) == 448  # the thumbnail path really ran


def test_resizing_an_image_already_at_the_model_size_is_a_copy():
    from viscpm import model_input_image

    image = photo((224, 224))
    again = model_input_image(image, 224)
    assert again is not image and again.tobytes() == image.tobytes()


def test_model_size_must_be_positive():
    with pytest.raises(ValueError, match="must be >= 1"):
        DecodeStage(size=0)

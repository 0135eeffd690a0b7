"""Decode stage (CPU tasks): encoded bytes (or a path/URI to read) -> RGB pixels, or an error row.

Per image: Pillow opens it with the decompression-bomb limit on (images above `max_pixels` are errors, not just
warnings); the first frame of an animation is used; big JPEGs are decoded in draft mode (DCT scaling, much cheaper
than a full decode) at no less than `max_side`; EXIF orientation is applied; any mode (CMYK, 16-bit, palette with
alpha, grayscale, ...) becomes RGB through `viscpm.to_rgb` (alpha composited on white); then a thumbnail
bounds the longer side by `max_side`. With the model's input `size` known (`DecodeStage(size=...)`), that thumbnail is
then resized to (size, size) by `viscpm.model_input_image`, the function the model's own preprocessing uses: the
model gets the very pixels it would have made from the thumbnail (its resize of an image already at its size is a
copy), for a fraction of the bytes between the stages (224x224x3 = 150,528 instead of 448x336x3 = 451,584 for a 4:3
photo) and no resize in the model actor. Whatever fails - null, empty, truncated, not an image, a bomb, an unreadable
path - becomes `status="error"` with the reason in `error_message`; the job goes on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from viscpm import model_input_image, to_rgb

from ..core.stage import Column, Stage, error_text
from ..core.storage import is_remote, locate
from . import schema as S

logger = logging.getLogger(__name__)

class DecodeError(ValueError):
    """An image could not be turned into RGB pixels (the message says why)."""


class _PillowLimits:
    """Pillow's limits are module globals: set ours for the duration of one decode, then restore them."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __enter__(self) -> None:
        self._saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error row, never half a picture
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # Pillow only warns between 1x and 2x the limit; we refuse the whole range
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


# EXIF orientations that turn the picture by 90 or 270 degrees (ImageOps.exif_transpose swaps width and height)
_TRANSPOSED = {5, 6, 7, 8}


def decode_image(data: bytes | None, max_side: int = 448, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image whose longer side is at most `max_side` (0: no limit)."""
    return decode_image_sized(data, max_side, max_pixels)[0]


def decode_image_sized(data: bytes | None, max_side: int = 448, max_pixels: int | None = None
                       ) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, plus the image's (width, height) as stored, after EXIF orientation and before any
    downscale (JPEG draft mode or the thumbnail)."""
    if data is None:
        raise DecodeError("image is null")
    if len(data) == 0:
        raise DecodeError("image is empty (0 bytes)")
    with _PillowLimits(max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError as exc:
            raise DecodeError(f"not an image Pillow can read ({len(data)} bytes)") from exc
        stored = image.size  # before draft(), which shrinks JPEGs while decoding
        if image.getexif().get(0x0112) in _TRANSPOSED:
            stored = (stored[1], stored[0])
        # Image.open leaves an animation on its first frame; draft() only acts on JPEG (DCT-domain downscale to
        # the smallest scale that is still >= max_side on both sides)
        if max_side and image.format == "JPEG":
            image.draft(None, (max_side, max_side))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        if image.width < 1 or image.height < 1:
            raise DecodeError(f"image has no pixels ({image.width}x{image.height})")
        if max_side and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return image, stored


def pixels_to_image(pixels: bytes, width: int, height: int) -> Image.Image:
    return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)


class DecodeStage(Stage):
    """Task stage: reads `__image` (bytes) or `__image_path`, writes `__pixels`/`__width`/`__height` and the output
    columns `width`/`height` (as stored) and `sha256` (of the bytes, even when they do not decode), or marks the row
    as an error. Rows already marked as errors upstream pass through untouched. `size`: the model's input size, to
    ship (size, size) pixels instead of the `max_side` thumbnail (None: the thumbnail)."""

    name = "decode"
    requires = (
        Column(S.KEY, "row id"),
        Column(S.IMAGE, "encoded image bytes, null to read __image_path"),
        Column(S.IMAGE_PATH, "path/URI of the image when __image is null"),
        Column(S.STATUS, "'ok' or 'error' (errors pass through)"),
        Column(S.ERROR, "error message of rows already failed"),
    )
    produces = (
        Column(S.PIXELS, "RGB uint8 bytes, row-major, height x width x 3 (null on error)"),
        Column(S.WIDTH, "pixel width"),
        Column(S.HEIGHT, "pixel height"),
        Column(S.IMAGE_WIDTH, "width as stored, after EXIF orientation (null: not decoded)"),
        Column(S.IMAGE_HEIGHT, "height as stored, after EXIF orientation (null: not decoded)"),
        Column(S.SHA256, "hex SHA-256 of the image bytes (null: no bytes)"),
    )

    def __init__(self, max_side: int = 448, max_pixels: int | None = None, input_root: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, size: int | None = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"model input size must be >= 1, got {size}")
        self.max_side = max_side
        self.size = size
        self.max_pixels = max_pixels
        self.input_root = input_root  # relative image paths are resolved against it
        self.storage_options = dict(storage_options or {})

    def _read_path(self, path: str) -> bytes:
        if not is_remote(path) and not os.path.isabs(path) and not path.startswith("file://"):
            if self.input_root is None:
                raise DecodeError(f"relative image path {path!r} and no input folder to resolve it against")
            path = self.input_root.rstrip("/") + "/" + path
        return locate(path, self.storage_options).read_bytes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch)
        n = batch.num_rows
        images = batch.column(S.IMAGE).to_pylist()
        paths = batch.column(S.IMAGE_PATH).to_pylist()
        status = batch.column(S.STATUS).to_pylist()
        errors = batch.column(S.ERROR).to_pylist()
        pixels: list[bytes | None] = [None] * n
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        stored: list[tuple[int, int] | None] = [None] * n
        digests: list[str | None] = [None] * n
        for i in range(n):
            if status[i] != S.STATUS_OK:
                continue
            try:
                data = images[i]
                if data is None and paths[i]:
                    data = self._read_path(paths[i])
                if data:  # hashed before decoding: a row that fails to decode still has it, for dedupe and joins
                    digests[i] = hashlib.sha256(data).hexdigest()
                image, stored[i] = decode_image_sized(data, self.max_side, self.max_pixels)
                if self.size is not None:  # after the thumbnail, so the model sees exactly what it saw before
                    image = model_input_image(image, self.size)
                pixels[i], widths[i], heights[i] = image.tobytes(), image.width, image.height
            except Exception as exc:  # noqa: BLE001 - any failure of one image is that row's error, by design
                status[i], errors[i] = S.STATUS_ERROR, error_text(self.name, exc)
        out = batch.drop_columns([S.IMAGE, S.IMAGE_PATH])
        out = out.set_column(out.schema.get_field_index(S.STATUS), S.STATUS, pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index(S.ERROR), S.ERROR, pa.array(errors, pa.string()))
        out = out.append_column(S.PIXELS, pa.array(pixels, pa.large_binary()))
        out = out.append_column(S.WIDTH, pa.array(widths, pa.int32()))
        out = out.append_column(S.HEIGHT, pa.array(heights, pa.int32()))
        out = out.append_column(S.IMAGE_WIDTH, pa.array([s[0] if s else None for s in stored], pa.int32()))
        out = out.append_column(S.IMAGE_HEIGHT, pa.array([s[1] if s else None for s in stored], pa.int32()))
        return out.append_column(S.SHA256, pa.array(digests, pa.string()))

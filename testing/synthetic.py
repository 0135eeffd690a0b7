"""Synthetic sample images for the demo, the benchmark and the tests (no downloads): small JPEG/PNG pictures of
coloured shapes, deterministic for a seed."""

from __future__ import annotations

import io
import random

import pyarrow as pa
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180)}


def synthetic_image(index: int, size: tuple[int, int] = (256, 192), seed: int = 0) -> tuple[Image.Image, str]:
    """A picture of one coloured shape on a plain background, and its description."""
    rng = random.Random(seed * 1_000_003 + index)
    shape, (colour, rgb) = rng.choice(SHAPES), rng.choice(sorted(COLOURS.items()))
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
    x1, y1 = x0 + rng.randint(w // 4, w // 2), y0 + rng.randint(h // 4, h // 2)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon(((x0, y1), ((x0 + x1) // 2, y0), (x1, y1)), fill=rgb)
    return image, f"a {colour} {shape}"


def encode(image: Image.Image, fmt: str = "JPEG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def synthetic_images_table(n: int, size: tuple[int, int] = (256, 192), seed: int = 0,
                           id_prefix: str = "img-") -> pa.Table:
    """`id` (string), `image` (JPEG bytes, every 4th PNG), `description` (what is drawn)."""
    ids, images, descriptions = [], [], []
    for i in range(n):
        image, description = synthetic_image(i, size, seed)
        ids.append(f"{id_prefix}{i:06d}")
        images.append(encode(image, "PNG") if i % 4 == 3 else encode(image, "JPEG", quality=90))
        descriptions.append(description)
    return pa.table({"id": ids, "image": pa.array(images, pa.binary()), "description": descriptions})

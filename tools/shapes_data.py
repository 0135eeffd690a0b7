"""The synthetic `shapes` task shared by the training script, the demo and the tests (never by the product packages).

One filled shape (circle, square, triangle pointing up) in one of four colours on a plain light background; captions
in English (`a red circle`) and Chinese (`一个红色的圆形`); the question's language selects the answer's.
`classify_pixels` is the simple pixel check that grades painted images (dominant colour, best-fitting shape).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 200, 20),
}
ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COLOUR_JITTER = 20
MIN_SIDE, MAX_SIDE = 64, 320
MIN_SPAN, MAX_SPAN = 0.35, 0.75  # of the shorter side

# Questions the training sees, and other phrasings held out for the tests.
TRAIN_QUESTIONS = {
    "en": ["What is in the image?", "What is in this image?", "What is in the picture?", "What do you see?",
           "Describe the image.", "Describe this image in detail.", "What is shown here?",
           "What is this?", "Caption this image.", "What shape is in the image?", "Tell me what the image shows.",
           "What does the picture show?", "what is in the image", "WHAT IS IN THE IMAGE?"],
    "zh": ["图片里有什么？", "这张图片里有什么？", "图中是什么？", "图片中有什么东西？", "请描述这张图片。",
           "这是什么？", "描述一下这幅图。", "画面里有什么？", "图里画的是什么？", "请告诉我图片里有什么",
           "图片里有什么", "这张图上有什么？"],
}
HELD_OUT_QUESTIONS = {
    "en": ["What's in this picture?", "Can you describe the picture?", "What object is shown in the image?"],
    "zh": ["这幅图里画了什么？", "图像中有什么？", "你在图片里看到了什么？"],
}
# canonical questions of the task statement
QUESTION = {"en": "What is in the image?", "zh": "图片里有什么？"}


@dataclass(frozen=True)
class Label:
    colour: str
    shape: str

    def caption(self, lang: str) -> str:
        if lang == "en":
            return f"a {self.colour} {self.shape}"
        return f"一个{ZH_COLOURS[self.colour]}的{ZH_SHAPES[self.shape]}"


LABELS = [Label(c, s) for c in COLOURS for s in SHAPES]


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """(language, colour, shape) named in a caption; None where absent or ambiguous."""
    lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"
    names = ({c: z for c, z in ZH_COLOURS.items()}, {s: z for s, z in ZH_SHAPES.items()}) if lang == "zh" else (
        {c: c for c in COLOURS}, {s: s for s in SHAPES})
    colours = [c for c, word in names[0].items() if word in text]
    shapes = [s for s, word in names[1].items() if word in text]
    return lang, colours[0] if len(colours) == 1 else None, shapes[0] if len(shapes) == 1 else None


def draw(label: Label, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One picture of `label`: a jittered colour, a light background, the shape anywhere fully inside."""
    w, h = size
    background = tuple(rng.randint(200, 255) for _ in range(3))
    fill = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[label.colour])
    span = max(2, round(rng.uniform(MIN_SPAN, MAX_SPAN) * min(w, h)))
    x0, y0 = rng.randint(0, w - span), rng.randint(0, h - span)
    x1, y1 = x0 + span - 1, y0 + span - 1
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    if label.shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=fill)
    elif label.shape == "square":
        pen.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        pen.polygon(((x0, y1), ((x0 + x1) / 2, y0), (x1, y1)), fill=fill)
    return image


def encode(image: Image.Image, rng: random.Random) -> bytes:
    """PNG or JPEG (quality 75-95), chosen by `rng`."""
    sink = io.BytesIO()
    if rng.random() < 0.5:
        image.save(sink, "PNG")
    else:
        image.save(sink, "JPEG", quality=rng.randint(75, 95))
    return sink.getvalue()


def sample(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[Label, Image.Image]:
    """A random label drawn at a random size (64-320 px each side) unless `size` is given."""
    label = rng.choice(LABELS)
    if size is None:
        size = (rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE))
    return label, draw(label, size, rng)


def sample_file(rng: random.Random) -> tuple[Label, bytes]:
    """A random label as PNG/JPEG bytes (what a caption job reads)."""
    label, image = sample(rng)
    return label, encode(image, rng)


# ---- the pixel check for painted images ----------------------------------------------------------------------
def _templates(h: int, w: int, box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    x0, y0, x1, y1 = box
    out = {}
    for shape in SHAPES:
        canvas = Image.new("L", (w, h), 0)
        pen = ImageDraw.Draw(canvas)
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=1)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=1)
        else:
            pen.polygon(((x0, y1), ((x0 + x1) / 2, y0), (x1, y1)), fill=1)
        out[shape] = np.asarray(canvas, dtype=bool)
    return out


def classify_pixels(image: Image.Image | np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of a picture by a simple pixel check: foreground = pixels with a dark channel (every
    palette colour has one, the background has none); colour = the palette entry nearest the foreground's mean;
    shape = the template (ellipse, rectangle, up-triangle in the foreground's bounding box) of highest IoU.
    (None, None) when there is no foreground."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    mask = rgb.min(axis=-1) < 140
    if mask.sum() < 16:
        return None, None
    mean = rgb[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: float(((mean - np.asarray(COLOURS[c])) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    # a robust bounding box: stray pixels do not stretch it
    x0, x1 = np.percentile(xs, [1, 99]).round().astype(int)
    y0, y1 = np.percentile(ys, [1, 99]).round().astype(int)
    templates = _templates(*mask.shape, (int(x0), int(y0), int(x1), int(y1)))
    iou = {s: (t & mask).sum() / max(1, (t | mask).sum()) for s, t in templates.items()}
    return colour, max(iou, key=iou.get)

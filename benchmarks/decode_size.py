"""What the caption job's decode tasks ship per row, and what decoding and the model's preprocessing cost per image,
with the decode tasks shipping the `--max-image-side` thumbnail (before) or the model's input size (after).

Input: photo-like 1024x768 JPEGs (smooth colour fields plus grain, quality 90). "decode task" is `DecodeStage` on a
batch of them; "actor preprocessing" is what the caption actor does with the shipped bytes before the encoder
(`pixels_to_image` + `viscpm.preprocess_images`, which resizes unless the image is already at the model's size).

    PYTHONPATH=. python benchmarks/decode_size.py [--images 32 --repeats 5 --size 224]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.caption import schema as S
from pipelines.caption.decode import DecodeStage, pixels_to_image


def photo_jpeg(seed: int, size: tuple[int, int] = (1024, 768)) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 8, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def batch_of(images: list[bytes]) -> pa.Table:
    n = len(images)
    return pa.table({S.KEY: [str(i) for i in range(n)], S.QUESTION: ["q"] * n, S.STATUS: [S.STATUS_OK] * n,
                     S.ERROR: pa.nulls(n, pa.string()), S.IMAGE: pa.array(images, pa.large_binary()),
                     S.IMAGE_PATH: pa.nulls(n, pa.string())})


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="the model's input size (VisCPM-Chat: 224)")
    args = parser.parse_args()

    import torch

    from viscpm.image import preprocess_images

    torch.set_num_threads(1)
    batch = batch_of([photo_jpeg(i) for i in range(args.images)])
    outputs = {}
    for label, size in (("before (448 thumbnail)", None), (f"after ({args.size} px)", args.size)):
        stage = DecodeStage(max_side=448, size=size)
        decode_s, out = best_of(args.repeats, lambda: stage(batch))
        rows = out.to_pylist()
        images = [pixels_to_image(r[S.PIXELS], r[S.WIDTH], r[S.HEIGHT]) for r in rows]
        actor_s, tensors = best_of(args.repeats, lambda: preprocess_images(
            [pixels_to_image(r[S.PIXELS], r[S.WIDTH], r[S.HEIGHT]) for r in rows], size=args.size))
        outputs[label] = tensors
        print(f"{label}: {len(rows[0][S.PIXELS]):,} bytes of __pixels per row ({images[0].width}x{images[0].height}x3); "
              f"decode task {1e3 * decode_s / args.images:.2f} ms/image; "
              f"actor preprocessing {1e3 * actor_s / args.images:.2f} ms/image")
    first, second = outputs.values()
    print(f"model inputs identical: {torch.equal(first, second)}")


if __name__ == "__main__":
    main()

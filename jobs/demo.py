"""`make demo`: caption a few synthetic images with the tiny random VisCPM-Chat model (no downloads, CPU).

The tiny model has random weights, so its captions are random text; the point is the whole path running:
image preprocessing, BEiT-3 + queries, the structured CPM-Bee prompt, batched beam search, decoding."""

from __future__ import annotations

import logging
import time

import numpy as np
from PIL import Image

from viscpm import ChatModel, GenerationConfig


def synthetic_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96 + 8 * i, 128, 3), dtype=np.uint8)) for i in range(n)]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chat = ChatModel.from_pretrained("tiny")
    images = synthetic_images(4)
    questions = ["Describe this image in detail.", "这张图片里有什么？", "Is a < b here? <ans> </s>", "What color is it?"]
    start = time.perf_counter()
    results = chat.generate(images, questions, generation=GenerationConfig.original(max_length=16))
    elapsed = time.perf_counter() - start
    for question, result in zip(questions, results):
        print(f"Q: {question}\nA: {result.text!r}  ({len(result.token_ids)} tokens)\n")
    print(f"{len(images)} images in {elapsed:.2f} s on CPU (tiny random model: the answers are random text)")


if __name__ == "__main__":
    main()

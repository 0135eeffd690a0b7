"""Stand-in models for the pipeline tests and benchmarks: they answer like the real model but cost a fixed time
per call (an emulated accelerator), so the pipeline's own behaviour and overhead can be measured without a model.

They plug into a job through its model-stage seam: `run_caption_job(config, model_stage=sleeping_caption_stage(0.1))`.
This module is pickled by value into Ray's workers (they need not import `testing`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import cloudpickle

from pipelines.caption.stage import CaptionStage


STANDIN_TOKENS = 3  # token ids per stand-in answer (what the generated-tokens metric counts)


@dataclass
class StandInResult:
    text: str
    finished: bool = True
    token_ids: list[int] = field(default_factory=lambda: list(range(STANDIN_TOKENS)))


class SleepingChat:
    """ChatModel's two halves: `prepare` does real host work (the model-size resize of every image), `generate_batch`
    sleeps `seconds_per_batch` (the device: sleeping releases the GIL, as a GPU does) and answers
    `"stand-in caption <w>x<h>"`. `record_to`: a file that gets one JSON line per call: what ("prepare" | "model"),
    start, end, pid, thread id (it is appended to from the actor's threads)."""

    def __init__(self, seconds_per_batch: float, record_to: str | None = None) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.name = f"sleep:{seconds_per_batch:g}"
        self.record_to = record_to

    def _note(self, what: str, start: float) -> None:
        if self.record_to:
            line = json.dumps({"what": what, "start": start, "end": time.time(), "pid": os.getpid(),
                               "thread": threading.get_ident()})
            with open(self.record_to, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def prepare(self, images: Sequence[Any], questions: Sequence[str]) -> list[tuple[int, int]]:
        if len(images) != len(questions):
            raise ValueError(f"need one image per question: {len(images)} images, {len(questions)} questions")
        start = time.time()
        for image in images:
            image.resize((224, 224))
        self._note("prepare", start)
        return [(im.width, im.height) for im in images]

    def generate_batch(self, sizes: list[tuple[int, int]], generation: Any = None) -> list[StandInResult]:
        start = time.time()
        time.sleep(self.seconds_per_batch)
        self._note("model", start)
        return [StandInResult(f"stand-in caption {w}x{h}") for w, h in sizes]

    def generate(self, images: Sequence[Any], questions: Sequence[str], generation: Any = None) -> list[StandInResult]:
        return self.generate_batch(self.prepare(images, questions), generation)


def sleeping_caption_stage(seconds_per_batch: float = 0.0, record_to: str | None = None) -> type[CaptionStage]:
    """A CaptionStage whose model is a SleepingChat (the config's --model is only a label then)."""
    if seconds_per_batch < 0:
        raise ValueError(f"sleep seconds must be >= 0, got {seconds_per_batch}")

    class SleepingCaptionStage(CaptionStage):
        def load_model(self) -> Any:
            return SleepingChat(seconds_per_batch, record_to)

        @classmethod
        def input_image_size(cls, model: str, storage_options: Any = None) -> int | None:
            return None  # --model is a label here: decode ships the thumbnail, whose size the stand-in answers with

    return SleepingCaptionStage


def preloaded_stage(stage_class: type, model: Any) -> type:
    """A subclass of a model stage that uses an already built model instead of loading one (in-process tests)."""

    class Preloaded(stage_class):  # type: ignore[misc, valid-type]
        def load_model(self) -> Any:
            return model

    return Preloaded


cloudpickle.register_pickle_by_value(sys.modules[__name__])

"""Stand-in models for the pipeline tests and benchmarks: they answer like the real model but cost a fixed time
per call (an emulated accelerator), so the pipeline's own behaviour and overhead can be measured without a model.

They plug into a job through its model-stage seam: `run_caption_job(config, model_stage=sleeping_caption_stage(0.1))`.
This module is pickled by value into Ray's workers (they need not import `testing`).
"""

from __future__ import annotations

import sys
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
    """Sleeps `seconds_per_batch` per call and answers `"stand-in caption <w>x<h>"` (ChatModel.generate's shape)."""

    def __init__(self, seconds_per_batch: float) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.name = f"sleep:{seconds_per_batch:g}"

    def generate(self, images: Sequence[Any], questions: Sequence[str], contexts: Sequence[str] | None = None,
                 generation: Any = None) -> list[StandInResult]:
        if len(images) != len(questions):
            raise ValueError(f"need one image per question: {len(images)} images, {len(questions)} questions")
        time.sleep(self.seconds_per_batch)
        return [StandInResult(f"stand-in caption {im.width}x{im.height}") for im in images]


def sleeping_caption_stage(seconds_per_batch: float = 0.0) -> type[CaptionStage]:
    """A CaptionStage whose model is a SleepingChat (the config's --model is only a label then)."""
    if seconds_per_batch < 0:
        raise ValueError(f"sleep seconds must be >= 0, got {seconds_per_batch}")

    class SleepingCaptionStage(CaptionStage):
        def load_model(self) -> Any:
            return SleepingChat(seconds_per_batch)

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

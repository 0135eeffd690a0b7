"""VisCPM models in clean PyTorch: CPM-Bee, VisCPM-Chat (image -> text), VisCPM-Paint (text -> image).
No Ray in this package.

The small public surface used by `pipelines/`:

    from viscpm import ChatModel, GenerationConfig, PaintModel, SamplingConfig
    chat = ChatModel.from_pretrained("tiny" | "/path/to/model", device="cuda", dtype="bfloat16")
    chat.answer(images, questions, contexts=None, generation=GenerationConfig.original())
    paint = PaintModel.from_pretrained("tiny" | "/path/to/model", device="cuda", dtype="bfloat16")
    paint.generate(prompts, seeds=[...], sampling=SamplingConfig.fast())

Paint and the safety components import diffusers/transformers, so they are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .chat import DEFAULT_QUESTION, ChatConfig, ChatModel, ChatResult
from .checkpoint import CheckpointError, load_cpmbee, read_state_dict
from .config import CPMBeeConfig
from .cpmbee import CPMBee
from .generation import GenerationConfig
from .inputs import BeeInputs, InputError
from .tokenizer import CPMBeeTokenizer, escape_user_text

_LAZY = {
    "PaintModel": "paint",
    "PaintConfig": "paint",
    "PaintResult": "paint",
    "SamplingConfig": "paint",
    "PromptSafetyChecker": "safety",
    "ImageSafetyChecker": "safety",
    "ClipReranker": "safety",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'viscpm' has no attribute {name!r}")


__all__ = [
    "BeeInputs",
    "CPMBee",
    "CPMBeeConfig",
    "CPMBeeTokenizer",
    "ChatConfig",
    "ChatModel",
    "ChatResult",
    "CheckpointError",
    "DEFAULT_QUESTION",
    "GenerationConfig",
    "InputError",
    "escape_user_text",
    "load_cpmbee",
    "read_state_dict",
    *_LAZY,
]

"""VisCPM models in clean PyTorch: CPM-Bee, VisCPM-Chat (image -> text), VisCPM-Paint (text -> image).
No Ray in this package.

The small public surface used by `pipelines/`:

    from viscpm import ChatModel, GenerationConfig, PaintModel, SamplingConfig
    chat = ChatModel.from_pretrained("tiny" | "shapes" | "/path/to/model", device="cuda", dtype="bfloat16")
    chat.answer(images, questions, contexts=None, generation=GenerationConfig.original())
    paint = PaintModel.from_pretrained("tiny" | "shapes" | "/path/to/model", device="cuda", dtype="bfloat16")
    paint.generate(prompts, seeds=[...], sampling=SamplingConfig.fast())

"""

from __future__ import annotations

import importlib
from typing import Any

# Every name is imported on first use: a process that only needs e.g. `viscpm.image.to_rgb` (a Ray decode worker)
# never pays for torch, diffusers or transformers.
_LAZY = {
    "ChatConfig": "chat",
    "ChatModel": "chat",
    "ChatResult": "chat",
    "DEFAULT_QUESTION": "chat",
    "CheckpointError": "checkpoint",
    "load_cpmbee": "checkpoint",
    "read_state_dict": "checkpoint",
    "CPMBeeConfig": "config",
    "CPMBee": "cpmbee",
    "GenerationConfig": "generation",
    "BeeInputs": "inputs",
    "InputError": "inputs",
    "CPMBeeTokenizer": "tokenizer",
    "escape_user_text": "tokenizer",
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


__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    return __all__

"""VisCPM models in clean PyTorch: CPM-Bee, VisCPM-Chat (image -> text), VisCPM-Paint (text -> image).
No Ray in this package.

The small public surface used by `pipelines/` (configs, `DEFAULT_QUESTION`, `to_rgb`, `model_input_image` and the
folder rules, `chat_image_size` included, import without torch):

    from viscpm import ChatModel, GenerationConfig, PaintModel, SamplingConfig
    chat = ChatModel.from_pretrained("tiny" | "shapes" | "/path/to/model", device="cuda", dtype="bfloat16")
    chat.answer(images, questions, contexts=None, generation=GenerationConfig.original())
    paint = PaintModel.from_pretrained("tiny" | "shapes" | "/path/to/model", device="cuda", dtype="bfloat16")
    paint.generate(prompts, seeds=[...], sampling=SamplingConfig.fast())

"""

from __future__ import annotations

import importlib
from typing import Any

# Every name is imported on first use: a process that only needs the configs or `to_rgb` (a driver, a Ray decode
# worker) never pays for torch, diffusers or transformers - `config`, `folders` and `image` import none of them.
_LAZY = {
    "BEiT3Config": "config",
    "ChatConfig": "config",
    "CPMBeeConfig": "config",
    "DEFAULT_QUESTION": "config",
    "DTYPES": "config",
    "GENERATION_PRESETS": "config",
    "GenerationConfig": "config",
    "PaintConfig": "config",
    "SamplingConfig": "config",
    "STRATEGIES": "config",
    "VisionQueryConfig": "config",
    "CONFIG_FILE": "folders",
    "MODEL_PRESETS": "folders",
    "chat_image_size": "folders",
    "model_folder_problem": "folders",
    "model_input_image": "image",
    "to_rgb": "image",
    "ChatBatch": "chat",
    "ChatModel": "chat",
    "ChatResult": "chat",
    "CheckpointError": "checkpoint",
    "LoadReport": "checkpoint",
    "load_cpmbee": "checkpoint",
    "read_state_dict": "checkpoint",
    "CPMBee": "cpmbee",
    "BeeInputs": "inputs",
    "InputError": "inputs",
    "CPMBeeTokenizer": "tokenizer",
    "escape_user_text": "tokenizer",
    "to_rgb": "image",
    "PaintModel": "paint",
    "PaintResult": "paint",
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

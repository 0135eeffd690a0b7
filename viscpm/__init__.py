"""VisCPM models in clean PyTorch: CPM-Bee, VisCPM-Chat (image -> text). No Ray in this package.

The small public surface used by `pipelines/`:

    from viscpm import ChatModel, GenerationConfig
    chat = ChatModel.from_pretrained("tiny" | "/path/to/model", device="cuda", dtype="bfloat16")
    chat.answer(images, questions, contexts=None, generation=GenerationConfig.original(max_length=100))
"""

from .chat import DEFAULT_QUESTION, ChatConfig, ChatModel, ChatResult
from .checkpoint import CheckpointError, load_cpmbee, read_state_dict
from .config import CPMBeeConfig
from .cpmbee import CPMBee
from .generation import GenerationConfig
from .inputs import BeeInputs, InputError
from .tokenizer import CPMBeeTokenizer, escape_user_text

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
]

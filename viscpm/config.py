"""CPM-Bee configuration: a plain, serialisable dataclass with named presets and a loader for the
original `config/cpm-bee-10b.json` format. Imports nothing heavy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

# dtype names accepted in configs; torch dtypes are resolved where tensors are made, not here.
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CPMBeeConfig:
    vocab_size: int = 86583
    dim_model: int = 4096
    num_heads: int = 32
    dim_head: int = 128
    dim_ff: int = 10240
    num_layers: int = 48
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    # the original rotates ext-token embeddings by sub * 16 (EmbeddingExt's distance_scale)
    ext_rotary_distance_scale: int = 16
    # dtype the original checkpoint was trained/stored in; weights may be cast at load time
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.dim_model % 2:
            raise ValueError("dim_model must be even (the ext-token rotary embedding rotates pairs)")

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "CPMBeeConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown CPM-Bee preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CPMBeeConfig":
        """Accepts our own keys and the original CPMBeeConfig keys (`half`, `dropout_p`, `mask_modules`)."""
        data = dict(data)
        if "half" in data:
            half = data.pop("half")
            data.setdefault("dtype", "float16" if half else "float32")
        dropout = data.pop("dropout_p", 0.0)
        if dropout:
            raise ValueError("dropout_p must be 0 for inference")
        if data.pop("mask_modules", None):
            raise ValueError("mask_modules (layers without attention/FFN) are not supported")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CPM-Bee config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "CPMBeeConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dim_attn(self) -> int:
        """Width of q/k/v: num_heads * dim_head (need not equal dim_model)."""
        return self.num_heads * self.dim_head


PRESETS: dict[str, CPMBeeConfig] = {
    # values of the original config/cpm-bee-10b.json
    "cpm-bee-10b": CPMBeeConfig(),
    # small random model for tests and the demo; vocab_size = len(tokenizer.synthetic_vocab()) (a test checks it)
    "tiny": CPMBeeConfig(
        vocab_size=2982, dim_model=32, num_heads=4, dim_head=16, dim_ff=64, num_layers=2, dtype="float32"
    ),
}

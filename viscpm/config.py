"""Every model and decoding configuration of the package: plain, serialisable dataclasses, each with named presets
looked up one way, `Config.from_name(name, **overrides)`. Imports nothing heavy (no torch, no diffusers), so a
driver or a CPU worker can build and validate configs without loading the models.

| class | presets |
|---|---|
| `CPMBeeConfig` | `cpm-bee-10b` (the original `config/cpm-bee-10b.json`), `tiny` |
| `BEiT3Config` | `beit3-large` (VisCPM-Chat's), `beit3-base`, `tiny` |
| `VisionQueryConfig` | `viscpm-chat` (BEiT-3 large + 64 queries -> width 4096), `tiny` |
| `ChatConfig` | `viscpm-chat`, `tiny` |
| `PaintConfig` | `viscpm-paint` (CPM-Bee 10B + Stable Diffusion 2.1-base), `tiny` |
| `GenerationConfig` | `default`, `original` (VisCPM-Chat's own `chat()` settings) |
| `SamplingConfig` | `default` (50 DDPM steps, as the original), `fast` (20 DPM-Solver++ steps) |

The `tiny` models have the real structure at test size; their CPM-Bee vocabulary is the tokenizer's synthetic one.
Dtypes are names (`DTYPES`); torch dtypes are resolved where tensors are made (`viscpm.checkpoint.torch_dtype`).
The diffusers UNet/VAE/scheduler configs of `PaintConfig` are plain dicts (their constructor keyword arguments).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

# dtype names accepted in configs and by the loaders' `dtype=` arguments
DTYPES = ("float32", "float16", "bfloat16")
# the question asked when none is given (VisCPM-Chat's captioning prompt)
DEFAULT_QUESTION = "Describe this image in detail."

_Config = TypeVar("_Config")


def _preset(presets: Mapping[str, _Config], kind: str, name: str, overrides: dict[str, Any]) -> _Config:
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; known: {sorted(presets)}")
    return replace(presets[name], **overrides) if overrides else presets[name]  # type: ignore[type-var]


# ------------------------------------------------------------------------------------------------------- CPM-Bee
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

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CPMBeeConfig:
        return _preset(CPMBEE_PRESETS, "CPM-Bee", name, overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CPMBeeConfig:
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
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CPM-Bee config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> CPMBeeConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dim_attn(self) -> int:
        """Width of q/k/v: num_heads * dim_head (need not equal dim_model)."""
        return self.num_heads * self.dim_head


CPMBEE_PRESETS: dict[str, CPMBeeConfig] = {
    "cpm-bee-10b": CPMBeeConfig(),
    # vocab_size = len(tokenizer.synthetic_vocab()) (a test checks it)
    "tiny": CPMBeeConfig(
        vocab_size=2982, dim_model=32, num_heads=4, dim_head=16, dim_ff=64, num_layers=2, dtype="float32"
    ),
}


# ------------------------------------------------------------------------------------------------------- BEiT-3
# Fairseq-style positional tables start numbering at padding_idx + 1 = 2.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BEiT3Config:
    """Shape of a BEiT-3 encoder (names follow the model, not torchscale's EncoderConfig)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    num_heads: int = 16
    ffn_dim: int = 4096
    num_layers: int = 24
    layernorm_eps: float = 1e-5
    max_source_positions: int = 1024  # rows of the query (``B``) position table
    # Only describes the checkpoint's unused ``text_embed.weight`` (dropped on load; used to sanity-check it).
    text_vocab_size: int = 64010

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """cls + patches: the multiway split position (197 for 224/16)."""
        return self.num_patches + 1

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BEiT3Config:
        return _preset(BEIT3_PRESETS, "BEiT-3", name, overrides)

    from_preset = from_name

    @classmethod
    def from_encoder_kwargs(cls, kwargs: Mapping[str, Any]) -> BEiT3Config:
        """Build from torchscale ``EncoderConfig`` keyword names (e.g. chat_config.json ``beit3.kwargs``).

        Structural flags this implementation hard-wires are checked when present, so a checkpoint built with
        another BEiT-3 variant fails loudly instead of silently computing something else.
        """
        for flag, expected in _HARDWIRED_ENCODER_FLAGS.items():
            if flag in kwargs and kwargs[flag] != expected:
                raise NotImplementedError(f"BEiT-3 option {flag}={kwargs[flag]!r} is not supported (need {expected!r})")
        default = cls()
        values = {ours: kwargs[theirs] for theirs, ours in _ENCODER_KWARG_NAMES.items() if theirs in kwargs}
        return cls(**{f.name: values.get(f.name, getattr(default, f.name)) for f in fields(cls)})


# torchscale EncoderConfig name -> BEiT3Config field
_ENCODER_KWARG_NAMES = {
    "img_size": "img_size",
    "patch_size": "patch_size",
    "in_chans": "in_chans",
    "encoder_embed_dim": "embed_dim",
    "encoder_attention_heads": "num_heads",
    "encoder_ffn_embed_dim": "ffn_dim",
    "encoder_layers": "num_layers",
    "layernorm_eps": "layernorm_eps",
    "max_source_positions": "max_source_positions",
    "vocab_size": "text_vocab_size",
}

# The BEiT-3 variant VisCPM uses (_get_large_config): anything else would need other code paths.
_HARDWIRED_ENCODER_FLAGS: dict[str, Any] = {
    "multiway": True,
    "subln": True,
    "encoder_normalize_before": True,
    "normalize_output": True,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "no_output_layer": True,
    "deepnorm": False,
    "rel_pos_buckets": 0,
    "moe_freq": 0,
    "xpos_rel_pos": False,
    "activation_fn": "gelu",
}

BEIT3_PRESETS: dict[str, BEiT3Config] = {
    "beit3-base": BEiT3Config(embed_dim=768, num_heads=12, ffn_dim=3072, num_layers=12),
    "beit3-large": BEiT3Config(embed_dim=1024, num_heads=16, ffn_dim=4096, num_layers=24),
    "tiny": BEiT3Config(embed_dim=32, num_heads=4, ffn_dim=64, num_layers=2, text_vocab_size=16),
}


@dataclass(frozen=True)
class VisionQueryConfig:
    """BEiT-3 + ``query_num`` learned queries + mapping to the LLM width."""

    beit3: BEiT3Config = field(default_factory=lambda: BEIT3_PRESETS["beit3-large"])
    query_num: int = 64
    llm_dim: int = 4096

    def __post_init__(self) -> None:
        if self.query_num > self.beit3.max_source_positions - POSITION_OFFSET:
            raise ValueError(
                f"query_num {self.query_num} needs more than max_source_positions {self.beit3.max_source_positions}"
            )

    @property
    def vision_dim(self) -> int:
        # Queries are appended to the token embeddings, so their width is the encoder width.
        return self.beit3.embed_dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VisionQueryConfig:
        return _preset(VISION_PRESETS, "vision", name, overrides)

    @classmethod
    def from_chat_config(cls, cfg: Mapping[str, Any]) -> VisionQueryConfig:
        """Build from the chat_config.json layout (``beit3.kwargs`` / ``resolved_encoder_config``, ``query_num``,
        ``vision_dim``, ``llm.config_kwargs.dim_model``)."""
        beit3 = cfg["beit3"]
        kwargs = {**beit3.get("resolved_encoder_config", {}), **beit3.get("kwargs", {})}
        config = cls(
            beit3=BEiT3Config.from_encoder_kwargs(kwargs),
            query_num=int(cfg["query_num"]),
            llm_dim=int(cfg["llm"]["config_kwargs"]["dim_model"]),
        )
        if "vision_dim" in cfg and int(cfg["vision_dim"]) != config.vision_dim:
            raise ValueError(f"vision_dim {cfg['vision_dim']} != BEiT-3 embed_dim {config.vision_dim}")
        return config


VISION_PRESETS: dict[str, VisionQueryConfig] = {
    "viscpm-chat": VisionQueryConfig(beit3=BEIT3_PRESETS["beit3-large"], query_num=64, llm_dim=4096),
    "tiny": VisionQueryConfig(beit3=BEIT3_PRESETS["tiny"], query_num=64, llm_dim=CPMBEE_PRESETS["tiny"].dim_model),
}


# ---------------------------------------------------------------------------------------------------------- Chat
@dataclass(frozen=True)
class ChatConfig:
    llm: CPMBeeConfig = field(default_factory=lambda: CPMBEE_PRESETS["cpm-bee-10b"])
    vision: VisionQueryConfig = field(default_factory=lambda: VISION_PRESETS["viscpm-chat"])
    image_size: int = 224
    max_prompt_length: int = 3000  # the original's max_inp_length

    def __post_init__(self) -> None:
        if self.vision.llm_dim != self.llm.dim_model:
            raise ValueError(f"vision mapping width {self.vision.llm_dim} != LLM width {self.llm.dim_model}")
        if self.vision.beit3.img_size != self.image_size:
            raise ValueError(f"image_size {self.image_size} != BEiT-3 img_size {self.vision.beit3.img_size}")

    @classmethod
    def from_name(cls, name: str, vocab_size: int | None = None, **overrides: Any) -> ChatConfig:
        """`vocab_size`: the LLM's, for another vocabulary than the preset's."""
        config = _preset(CHAT_PRESETS, "Chat", name, overrides)
        return config if vocab_size is None else replace(config, llm=replace(config.llm, vocab_size=vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chat", "llm": self.llm.to_dict(), "vision": {"beit3": asdict(self.vision.beit3),
                "query_num": self.vision.query_num, "llm_dim": self.vision.llm_dim},
                "image_size": self.image_size, "max_prompt_length": self.max_prompt_length}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatConfig:
        if data.get("kind", "chat") != "chat":
            raise ValueError(f"not a chat config (kind={data.get('kind')!r})")
        vision = data["vision"]
        return cls(
            llm=CPMBeeConfig.from_dict(data["llm"]),
            vision=VisionQueryConfig(beit3=BEiT3Config(**vision["beit3"]), query_num=vision["query_num"],
                                     llm_dim=vision["llm_dim"]),
            image_size=data.get("image_size", 224),
            max_prompt_length=data.get("max_prompt_length", 3000),
        )

    @classmethod
    def from_saved(cls, data: Mapping[str, Any] | None) -> ChatConfig:
        """The config of a model folder from its `viscpm_config.json` (as a dict); None or empty: a folder without
        one (an original checkpoint), which is the real VisCPM-Chat."""
        return cls.from_dict(data) if data else cls()


CHAT_PRESETS: dict[str, ChatConfig] = {
    "viscpm-chat": ChatConfig(),
    # the real structure (64 queries, 224px, 2+2 layers) at test size
    "tiny": ChatConfig(llm=CPMBEE_PRESETS["tiny"], vision=VISION_PRESETS["tiny"]),
}


# -------------------------------------------------------------------------------------------------- generation
STRATEGIES = ("beam", "greedy", "sample")


@dataclass(frozen=True)
class GenerationConfig:
    """How Chat decodes. `beam` with the defaults below is the original VisCPM-Chat setting."""

    strategy: str = "beam"
    max_new_tokens: int = 64
    beam_size: int = 3
    repetition_penalty: float = 1.1
    length_penalty: float = 3.0
    temperature: float = 0.7
    top_p: float = 0.8  # `sample` only
    seed: int = 0  # `sample` only: row i uses seed + i unless seeds are passed per row

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.repetition_penalty < 1:
            raise ValueError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def used_settings(self) -> dict[str, Any]:
        """Every setting, None where `strategy` ignores it (greedy's argmax does not depend on the temperature)."""
        used = _USED_BY_STRATEGY[self.strategy]
        return {f.name: (getattr(self, f.name) if f.name in used else None) for f in fields(self)}

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GenerationConfig:
        return _preset(GENERATION_PRESETS, "generation", name, overrides)

    @classmethod
    def original(cls, max_length: int = 512, **overrides: Any) -> GenerationConfig:
        """VisCPMChat.chat's settings: beam 3, repetition penalty 1.1, length penalty 3, temperature 0.7, with the
        original's length quirk (answers of up to max_length + 2 tokens)."""
        return replace(cls(strategy="beam", max_new_tokens=max_length + 2, beam_size=3, repetition_penalty=1.1,
                           length_penalty=3.0, temperature=0.7), **overrides)


_USED_BY_STRATEGY = {
    "beam": {"strategy", "max_new_tokens", "beam_size", "repetition_penalty", "length_penalty", "temperature"},
    "greedy": {"strategy", "max_new_tokens", "repetition_penalty"},
    "sample": {"strategy", "max_new_tokens", "repetition_penalty", "temperature", "top_p", "seed"},
}

GENERATION_PRESETS: dict[str, GenerationConfig] = {
    "default": GenerationConfig(),
    "original": GenerationConfig.original(),
}


# --------------------------------------------------------------------------------------------------------- Paint
# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base: unet/, vae/, scheduler/ configs); the
# original builds its UNet from this config and trains it, and takes VAE and scheduler unchanged.
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "dual_cross_attention": False,
}
SD21_BASE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as a JSON-able dict without its private keys (`_class_name`, `_use_default_values`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")}


@dataclass(frozen=True)
class PaintConfig:
    """Everything that shapes a Paint model. The diffusers configs are plain dicts (their constructor kwargs)."""

    llm: CPMBeeConfig = field(default_factory=lambda: CPMBEE_PRESETS["cpm-bee-10b"])
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_SCHEDULER))
    trans_block_eps: float = 1e-6
    # Prompts longer than this (in tokens, incl. the structure tokens) are cut and flagged. The original has no
    # limit; a cap keeps one pathological prompt from exhausting memory in a batch job.
    max_prompt_length: int | None = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet", _plain(self.unet))
        object.__setattr__(self, "vae", _plain(self.vae))
        object.__setattr__(self, "scheduler", _plain(self.scheduler))
        if not isinstance(self.unet.get("cross_attention_dim"), int):
            raise ValueError("unet.cross_attention_dim must be one int (the trans_block's output width)")
        if self.unet.get("in_channels", 4) != self.vae.get("latent_channels", 4):
            raise ValueError(f"UNet in_channels {self.unet.get('in_channels')} != VAE latent_channels "
                             f"{self.vae.get('latent_channels')}")
        if self.max_prompt_length is not None and self.max_prompt_length < 16:
            raise ValueError(f"max_prompt_length must be >= 16 or None, got {self.max_prompt_length}")

    @classmethod
    def from_name(cls, name: str, vocab_size: int | None = None, **overrides: Any) -> PaintConfig:
        """`vocab_size`: the LLM's, for another vocabulary than the preset's. The diffusers dicts are copies."""
        config = replace(_preset(PAINT_PRESETS, "Paint", name, overrides))
        return config if vocab_size is None else replace(config, llm=replace(config.llm, vocab_size=vocab_size))

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [64])) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def default_size(self) -> int:
        """Native image size: UNet sample_size * VAE factor (512 for SD 2.1-base), as the original's default."""
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "paint", "llm": self.llm.to_dict(), "unet": dict(self.unet), "vae": dict(self.vae),
                "scheduler": dict(self.scheduler), "trans_block_eps": self.trans_block_eps,
                "max_prompt_length": self.max_prompt_length}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PaintConfig:
        if data.get("kind", "paint") != "paint":
            raise ValueError(f"not a paint config (kind={data.get('kind')!r})")
        unknown = set(data) - {"kind", "llm", "unet", "vae", "scheduler", "trans_block_eps", "max_prompt_length"}
        if unknown:
            raise ValueError(f"unknown Paint config keys: {sorted(unknown)}")
        return cls(
            llm=CPMBeeConfig.from_dict(data["llm"]) if "llm" in data else CPMBEE_PRESETS["cpm-bee-10b"],
            unet=data.get("unet", SD21_BASE_UNET),
            vae=data.get("vae", SD21_BASE_VAE),
            scheduler=data.get("scheduler", SD21_BASE_SCHEDULER),
            trans_block_eps=data.get("trans_block_eps", 1e-6),
            max_prompt_length=data.get("max_prompt_length", 512),
        )


PAINT_PRESETS: dict[str, PaintConfig] = {
    "viscpm-paint": PaintConfig(),
    # the structure of the real model at test size (the shapes of the reference fixtures): 64x64 images
    "tiny": PaintConfig(
        llm=CPMBEE_PRESETS["tiny"],
        unet={
            "sample_size": 32, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": 8, "use_linear_projection": True,
        },
        vae={
            "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "sample_size": 64,
        },
    ),
}


SCHEDULERS = ("ddpm", "dpmsolver++")
# "original": what VisCPM shipped with (diffusers 0.15.0, whose DDPM ignored steps_offset: 50 steps ->
# 980, 960, ..., 0); "diffusers-current": today's diffusers with the SD config (steps_offset 1: 981, ..., 1).
TIMESTEP_SPACINGS = ("original", "diffusers-current")


@dataclass(frozen=True)
class SamplingConfig:
    """How Paint denoises. Part of an image's identity: the same (prompt, negative prompt, seed, SamplingConfig)
    gives the same image."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # None: the model's native size (512 for SD 2.1-base)
    width: int | None = None
    scheduler: str = "ddpm"  # "ddpm" (the original) | "dpmsolver++" (DPMSolverMultistepScheduler, fewer steps)
    timestep_spacing: str = "original"  # see TIMESTEP_SPACINGS

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (or None for the model's size), got {v!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SamplingConfig:
        return _preset(SAMPLING_PRESETS, "sampling", name, overrides)

    @classmethod
    def fast(cls, **overrides: Any) -> SamplingConfig:
        """20 DPM-Solver++ steps: about the quality of 50 DDPM steps at 40% of the UNet calls."""
        return cls.from_name("fast", **overrides)


SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "default": SamplingConfig(),
    "fast": SamplingConfig(num_inference_steps=20, scheduler="dpmsolver++"),
}

"""BEiT-3 vision encoder of VisCPM-Chat, plus its learned queries and the vision -> LLM mapping MLP.

VisCPM-Chat runs torchscale 0.2.0's BEiT-3 encoder (``BEiT3Wrapper``) on ``[cls, 196 patches, Q queries]`` and keeps
the outputs of the Q query tokens. What matters numerically:

* Multiway: every LayerNorm / Linear exists twice. The ``image`` copy (torchscale ``A``) handles the first
  ``1 + num_patches`` tokens, the ``query`` copy (``B``) the learned queries. Attention itself runs over all tokens,
  bidirectionally, with no mask.
* Positions (fairseq style, offset 2): image tokens add rows ``2 .. 2+n_img-1`` of the image table, queries add rows
  ``2 .. 2+Q-1`` of the query table (numbering restarts at 2 for the second part). Rows 0 and 1 are never read; they
  are kept so that the tables have the checkpoint's shapes. No embedding scale, no embedding LayerNorm.
* Layer (pre-LN with sub-LN, residual weight 1):
  ``x += out_proj(inner_norm(attn(attn_norm(x))))``, ``x += fc2(ffn_inner_norm(gelu(fc1(ffn_norm(x)))))``;
  q is scaled by ``head_dim ** -0.5`` after its bias; gelu is the exact (erf) one, computed in float32;
  every LayerNorm has eps 1e-5. A final multiway LayerNorm follows the last layer.
* ``mapping`` = Linear(E, d_llm) -> exact GELU -> Linear(d_llm, d_llm) turns the query outputs into LLM embeddings.

Checkpoints use the original key names (``vpm.beit3.*``, ``query``, ``mapping.*``, next to ``llm.*``);
:func:`load_vision_state_dict` maps them onto this module through an explicit, strict key map
(:func:`original_key_map`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

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
    def from_preset(cls, name: str) -> BEiT3Config:
        try:
            return BEIT3_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown BEiT-3 preset {name!r}; known: {sorted(BEIT3_PRESETS)}") from None

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
    def viscpm_chat(cls) -> VisionQueryConfig:
        """The real VisCPM-Chat values: BEiT-3 large, 64 queries, CPM-Bee 10B width 4096."""
        return cls(beit3=BEIT3_PRESETS["beit3-large"], query_num=64, llm_dim=4096)

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


# --------------------------------------------------------------------------------------------------------- modules


class Multiway(nn.Module):
    """Two copies of a token-wise module: ``image`` for tokens ``[0, split)``, ``query`` for ``[split, T)``."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.image = make()
        self.query = make()

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        if split >= x.shape[1]:
            return self.image(x)
        if split <= 0:
            return self.query(x)
        return torch.cat([self.image(x[:, :split]), self.query(x[:, split:])], dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.norm = nn.LayerNorm(hidden, eps=eps, **factory)  # sub-LN inside the FFN
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchscale computes gelu in float32 and casts back (matters for half precision only).
        return self.fc2(self.norm(F.gelu(self.fc1(x).float()).type_as(x)))


class MultiwayAttention(nn.Module):
    def __init__(self, config: BEiT3Config, **factory: Any) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layernorm_eps
        self.num_heads = config.num_heads
        self.scaling = config.head_dim**-0.5

        def linear() -> nn.Module:
            return nn.Linear(dim, dim, **factory)

        self.q_proj = Multiway(linear)
        self.k_proj = Multiway(linear)
        self.v_proj = Multiway(linear)
        self.inner_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps, **factory))  # sub-LN before out_proj
        self.out_proj = Multiway(linear)

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        b, t, e = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, e // self.num_heads).transpose(1, 2)

        # Scale q ourselves (after the bias, as the original) and tell SDPA not to scale again.
        q = heads(self.q_proj(x, split) * self.scaling)
        k = heads(self.k_proj(x, split))
        v = heads(self.v_proj(x, split))
        attn = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        attn = attn.transpose(1, 2).reshape(b, t, e)
        return self.out_proj(self.inner_norm(attn, split), split)


class BEiT3Layer(nn.Module):
    def __init__(self, config: BEiT3Config, **factory: Any) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layernorm_eps
        self.attn_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps, **factory))
        self.attn = MultiwayAttention(config, **factory)
        self.ffn_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps, **factory))
        self.ffn = Multiway(lambda: FeedForward(dim, config.ffn_dim, eps, **factory))

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x, split), split)
        return x + self.ffn(self.ffn_norm(x, split), split)


class BEiT3(nn.Module):
    """BEiT-3 encoder over ``[cls, patches]`` (+ optional query tokens handled by the ``query`` multiway copies)."""

    def __init__(
        self, config: BEiT3Config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        e = config.embed_dim
        self.patch_embed = nn.Conv2d(config.in_chans, e, config.patch_size, stride=config.patch_size, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, e, **factory))
        self.pos_embed_image = nn.Parameter(torch.empty(config.num_image_tokens + POSITION_OFFSET, e, **factory))
        self.pos_embed_query = nn.Parameter(torch.empty(config.max_source_positions, e, **factory))
        self.layers = nn.ModuleList(BEiT3Layer(config, **factory) for _ in range(config.num_layers))
        self.final_norm = Multiway(lambda: nn.LayerNorm(e, eps=config.layernorm_eps, **factory))

    def forward(self, pixel_values: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, C, H, W); queries (Q, E) shared by every sample, or (B, Q, E).

        Returns the query outputs (B, Q, E), or all token outputs (B, 1 + patches, E) when ``queries`` is None.
        """
        weight = self.patch_embed.weight
        x = self.patch_embed(pixel_values.to(device=weight.device, dtype=weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, patches, E)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        split = x.shape[1]
        if split + POSITION_OFFSET > self.pos_embed_image.shape[0]:
            raise ValueError(f"{split - 1} patches exceed the position table ({self.config.img_size}px images)")
        x = x + self.pos_embed_image[POSITION_OFFSET : POSITION_OFFSET + split]
        if queries is not None:
            if queries.dim() == 2:
                queries = queries.unsqueeze(0).expand(b, -1, -1)
            n_query = queries.shape[1]
            q = queries.to(x.dtype) + self.pos_embed_query[POSITION_OFFSET : POSITION_OFFSET + n_query]
            x = torch.cat([x, q], dim=1)
        for layer in self.layers:
            x = layer(x, split)
        x = self.final_norm(x, split)
        return x if queries is None else x[:, split:]


class VisionMapping(nn.Module):
    """Query outputs (width E) -> LLM input embeddings (width d)."""

    def __init__(self, vision_dim: int, llm_dim: int, **factory: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim, **factory)
        self.fc2 = nn.Linear(llm_dim, llm_dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU (nn.GELU() default)


class VisionQueryEncoder(nn.Module):
    """Images -> ``query_num`` LLM-width vision embeddings per image (VisCPM-Chat's ``vpm`` + ``query`` +
    ``mapping``). Build with ``device="meta"`` and use :func:`load_vision_state_dict` to load a checkpoint without
    ever materialising random weights."""

    def __init__(
        self,
        config: VisionQueryConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.beit3 = BEiT3(config.beit3, **factory)
        self.query = nn.Parameter(torch.empty(config.query_num, config.vision_dim, **factory))
        self.mapping = VisionMapping(config.vision_dim, config.llm_dim, **factory)
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init (for tests / training from scratch): BEiT-3's recipe, trunc-normal(.02) at +-std."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.beit3.cls_token, self.beit3.pos_embed_image, self.beit3.pos_embed_query, self.query):
            nn.init.trunc_normal_(p, std=0.02, a=-0.02, b=0.02)

    def query_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> BEiT-3 query outputs (B, query_num, vision_dim)."""
        return self.beit3(pixel_values, self.query)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> vision hidden states (B, query_num, llm_dim)."""
        return self.mapping(self.query_features(pixel_values))


# ----------------------------------------------------------------------------------------------------- checkpoints

# Keys of the original VLU_CPMBee state dict that we deliberately do not load (present or absent, both fine).
DROPPED_ORIGINAL_KEYS: dict[str, str] = {
    "vpm.mim_head.weight": "BEiT3Wrapper's masked-image-modelling head; never used for inference",
    "vpm.mim_head.bias": "BEiT3Wrapper's masked-image-modelling head; never used for inference",
    "vpm.beit3.vision_embed.mask_token": "only used for masked pre-training inputs",
    "vpm.beit3.text_embed.weight": "BEiT-3 text embedding; VisCPM only used it to initialise `query`",
}
# Keys the LLM loader handles.
IGNORED_ORIGINAL_PREFIXES: tuple[str, ...] = ("llm.",)

_ORIG_BEIT3 = "vpm.beit3."
_WAYS = {"A": "image", "B": "query"}
# original per-layer module path (before .A/.B) -> ours
_LAYER_MULTIWAY = {
    "self_attn_layer_norm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.inner_attn_ln": "attn.inner_norm",
    "self_attn.out_proj": "attn.out_proj",
    "final_layer_norm": "ffn_norm",
}
# original FFN sub-module (after ffn.A / ffn.B) -> ours
_FFN_PARTS = {"fc1": "fc1", "ffn_layernorm": "norm", "fc2": "fc2"}


def original_key_map(config: VisionQueryConfig) -> dict[str, str]:
    """Original checkpoint key -> our parameter name, for every parameter of :class:`VisionQueryEncoder`."""
    m: dict[str, str] = {
        "query": "query",
        "mapping.0.weight": "mapping.fc1.weight",
        "mapping.0.bias": "mapping.fc1.bias",
        "mapping.2.weight": "mapping.fc2.weight",
        "mapping.2.bias": "mapping.fc2.bias",
        _ORIG_BEIT3 + "vision_embed.proj.weight": "beit3.patch_embed.weight",
        _ORIG_BEIT3 + "vision_embed.proj.bias": "beit3.patch_embed.bias",
        _ORIG_BEIT3 + "vision_embed.cls_token": "beit3.cls_token",
        _ORIG_BEIT3 + "encoder.embed_positions.A.weight": "beit3.pos_embed_image",
        _ORIG_BEIT3 + "encoder.embed_positions.B.weight": "beit3.pos_embed_query",
    }
    for way, ours_way in _WAYS.items():
        for wb in ("weight", "bias"):
            m[f"{_ORIG_BEIT3}encoder.layer_norm.{way}.{wb}"] = f"beit3.final_norm.{ours_way}.{wb}"
            for i in range(config.beit3.num_layers):
                src, dst = f"{_ORIG_BEIT3}encoder.layers.{i}.", f"beit3.layers.{i}."
                for theirs, ours in _LAYER_MULTIWAY.items():
                    m[f"{src}{theirs}.{way}.{wb}"] = f"{dst}{ours}.{ours_way}.{wb}"
                for theirs, ours in _FFN_PARTS.items():
                    m[f"{src}ffn.{way}.{theirs}.{wb}"] = f"{dst}ffn.{ours_way}.{ours}.{wb}"
    return m


class VisionStateDictError(ValueError):
    """The checkpoint does not fit the vision encoder; lists every offending key."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {', '.join(mismatched)}")
        super().__init__("vision state dict does not match the model: " + "; ".join(parts))


@dataclass
class VisionLoadReport:
    """What :func:`load_vision_state_dict` did with each checkpoint key (original names)."""

    loaded: list[str]
    dropped: list[str]  # deliberately dropped keys that were present
    ignored: list[str]  # keys left to other loaders (llm.*)

    @property
    def absent_dropped(self) -> list[str]:
        """Deliberately dropped keys the checkpoint did not have (e.g. vpm.mim_head.* in the fixtures)."""
        return sorted(set(DROPPED_ORIGINAL_KEYS) - set(self.dropped))


def load_vision_state_dict(
    module: VisionQueryEncoder,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VisionLoadReport:
    """Load an original-key checkpoint (``vpm.beit3.*``, ``query``, ``mapping.*``; ``llm.*`` ignored) strictly.

    A module built on the ``meta`` device gets the checkpoint tensors assigned (``assign=True``), converted to
    ``dtype`` (default: the dtype it was built with) on ``device`` (default: where the tensor is) — no second copy
    of the weights is made when they already have that dtype/device. A materialised module is copied into in place
    (its own device/dtype win; ``device``/``dtype`` then move it afterwards).

    Raises :class:`VisionStateDictError` naming every missing, unexpected or mis-shaped key.
    """
    key_map = original_key_map(module.config)
    targets = module.state_dict(keep_vars=True)
    if set(key_map.values()) != set(targets):  # guards the map against drift in the module definition
        raise RuntimeError(f"key map out of sync with the module: {sorted(set(key_map.values()) ^ set(targets))}")

    loaded, dropped, ignored, unexpected, mismatched = [], [], [], [], []
    renamed: dict[str, torch.Tensor] = {}
    for key in state_dict.keys():
        if key.startswith(IGNORED_ORIGINAL_PREFIXES):
            ignored.append(key)
        elif key in DROPPED_ORIGINAL_KEYS:
            dropped.append(key)
        elif key not in key_map:
            unexpected.append(key)
        else:
            tensor, ours = state_dict[key], key_map[key]
            if tuple(tensor.shape) != tuple(targets[ours].shape):
                mismatched.append(f"{key} {tuple(tensor.shape)} != expected {tuple(targets[ours].shape)}")
            else:
                renamed[ours] = tensor
                loaded.append(key)
    missing = sorted(k for k in key_map if k not in state_dict)
    if missing or unexpected or mismatched:
        raise VisionStateDictError(missing, sorted(unexpected), sorted(mismatched))
    _check_text_embed(module.config, state_dict)

    if any(t.is_meta for t in targets.values()):
        renamed = {
            name: t.to(device=device if device is not None else t.device, dtype=dtype or targets[name].dtype)
            for name, t in renamed.items()
        }
        module.load_state_dict(renamed, strict=True, assign=True)
    else:
        module.load_state_dict(renamed, strict=True)
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
    report = VisionLoadReport(loaded=sorted(loaded), dropped=sorted(dropped), ignored=sorted(ignored))
    logger.info(
        "vision weights: %d loaded, dropped %s, %d llm.* keys left to the LLM loader",
        len(report.loaded), report.dropped, len(report.ignored),
    )
    return report


def _check_text_embed(config: VisionQueryConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    key = _ORIG_BEIT3 + "text_embed.weight"
    if key in state_dict:
        expected = (config.beit3.text_vocab_size, config.beit3.embed_dim)
        if tuple(state_dict[key].shape) != expected:  # harmless for inference, but hints at a config mix-up
            logger.warning("%s has shape %s, config says %s", key, tuple(state_dict[key].shape), expected)


def load_vision_encoder(
    config: VisionQueryConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[VisionQueryEncoder, VisionLoadReport]:
    """Build on ``meta`` and assign the checkpoint's tensors: the weights exist once, on ``device`` in ``dtype``."""
    module = VisionQueryEncoder(config, device="meta", dtype=dtype)
    report = load_vision_state_dict(module, state_dict, device=device, dtype=dtype)
    return module.eval(), report


def to_original_state_dict(module: VisionQueryEncoder) -> dict[str, torch.Tensor]:
    """Our parameters under the original checkpoint names (the inverse of the key map; dropped keys absent)."""
    ours = module.state_dict()
    return {theirs: ours[name] for theirs, name in original_key_map(module.config).items()}

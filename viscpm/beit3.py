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
:func:`load_vision_encoder` loads them through ``viscpm.keymaps.VISION_KEY_MAP`` on the package's one strict,
reported loading path (``viscpm.checkpoint``). The configs live in ``viscpm.config``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import LoadReport, load_into, load_state_dict_into, original_state_dict
from .config import BEIT3_PRESETS as BEIT3_PRESETS
from .config import POSITION_OFFSET, BEiT3Config, VisionQueryConfig
from .keymaps import DROPPED_ORIGINAL_KEYS as DROPPED_ORIGINAL_KEYS
from .keymaps import IGNORED_ORIGINAL_PREFIXES as IGNORED_ORIGINAL_PREFIXES
from .keymaps import VISION_KEY_MAP

logger = logging.getLogger(__name__)


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
def original_key_map(config: VisionQueryConfig) -> dict[str, str]:
    """Original checkpoint key -> our parameter name, for every parameter of :class:`VisionQueryEncoder`."""
    return VISION_KEY_MAP.expand(config.beit3.num_layers)


def load_vision_state_dict(
    module: VisionQueryEncoder,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadReport:
    """Load the vision keys of an original checkpoint (``vpm.beit3.*``, ``query``, ``mapping.*``; ``llm.*`` is
    left to the LLM loader) into `module`, strictly (see ``viscpm.checkpoint.load_state_dict_into``)."""
    report = load_state_dict_into(module, state_dict, VISION_KEY_MAP, "vision encoder", device, dtype)
    _check_text_embed(module.config, state_dict)
    return report


def load_vision_encoder(
    config: VisionQueryConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[VisionQueryEncoder, LoadReport]:
    """Build on ``meta`` and assign the checkpoint's tensors: the weights exist once, on ``device`` in ``dtype``."""
    module, report = load_into(lambda: VisionQueryEncoder(config, device="meta"), state_dict, VISION_KEY_MAP,
                               "vision encoder", device, dtype)
    _check_text_embed(config, state_dict)
    return module.eval(), report


def _check_text_embed(config: VisionQueryConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    key = "vpm.beit3.text_embed.weight"
    if key in state_dict:
        expected = (config.beit3.text_vocab_size, config.beit3.embed_dim)
        if tuple(state_dict[key].shape) != expected:  # harmless for inference, but hints at a config mix-up
            logger.warning("%s has shape %s, config says %s", key, tuple(state_dict[key].shape), expected)


def to_original_state_dict(module: VisionQueryEncoder) -> dict[str, torch.Tensor]:
    """Our parameters under the original checkpoint names (the inverse of the key map; dropped keys absent)."""
    return original_state_dict(module, VISION_KEY_MAP)

"""How the original VisCPM checkpoints' key names map onto our parameter names, in both directions (torch-free).

A checkpoint holds several parts (Chat: `llm.*` + the vision side; Paint: `llm.*`, `trans_block.*`, `unet.*`, and
a VAE). Each part has one `KeyMap`: `to_ours` reads an original key, `to_original` names one of our parameters in
the original layout (for `convert` and for exporting), both from the same rules. `viscpm.checkpoint` loads through
these maps strictly and reports what it did.

* `TableKeyMap` - an explicit table, original -> ours; `{}` stands for a layer index (as torchtitan's state-dict
  adapters write it), so one row covers every layer and the reverse is the same table read backwards.
* `RegexKeyMap` - ordered regex rules for parts whose names are ours already (diffusers' UNet and VAE) up to a
  prefix and an older library's spellings; the reverse writes our own spelling under the prefix.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

_LAYER = re.compile(r"\.(\d+)\.")  # the first `.<number>.` of a key: its layer index


class KeyMap(ABC):
    """The original keys of one checkpoint part <-> our parameter names.

    `prefix`: the part's keys start with it (the rules see the key without it). `leave`: prefixes of keys that
    belong to other parts of the same checkpoint (their own loaders read them). `dropped`: full checkpoint keys
    the model ignores on purpose, present or not, each with the reason.
    """

    def __init__(self, prefix: str = "", leave: tuple[str, ...] = (), dropped: Mapping[str, str] | None = None):
        self.prefix, self.leave, self.dropped = prefix, tuple(leave), dict(dropped or {})

    def owns(self, key: str) -> bool:
        """Whether the checkpoint key belongs to this part."""
        return key.startswith(self.prefix) and not key.startswith(self.leave)

    def to_ours(self, key: str) -> str | None:
        """Our parameter name for a checkpoint key of this part; None when no rule reads it."""
        return self._ours(key[len(self.prefix) :]) if key.startswith(self.prefix) else None

    def to_original(self, name: str) -> str:
        """The original checkpoint key of our parameter `name`; KeyError when no rule names it."""
        key = self.prefix + self._original(name)
        if self.to_ours(key) != name:
            raise KeyError(f"{name}: the key map does not name this parameter")
        return key

    @abstractmethod
    def _ours(self, rest: str) -> str | None: ...

    @abstractmethod
    def _original(self, name: str) -> str: ...


class TableKeyMap(KeyMap):
    """An explicit table original -> ours (without the prefix); `{}` in a row stands for a layer index."""

    def __init__(self, prefix: str, table: Mapping[str, str], leave: tuple[str, ...] = (),
                 dropped: Mapping[str, str] | None = None):
        super().__init__(prefix, leave, dropped)
        self.table = dict(table)
        self.reverse = {ours: original for original, ours in self.table.items()}
        if len(self.reverse) != len(self.table):
            raise ValueError(f"key map {prefix!r}: two original keys map to the same parameter")

    @staticmethod
    def _lookup(table: Mapping[str, str], key: str) -> str | None:
        if key in table:
            return table[key]
        layer = _LAYER.search(key)
        if layer is None:
            return None
        row = table.get(key[: layer.start()] + ".{}." + key[layer.end() :])
        return None if row is None else row.replace("{}", layer.group(1))

    def _ours(self, rest: str) -> str | None:
        return self._lookup(self.table, rest)

    def _original(self, name: str) -> str:
        original = self._lookup(self.reverse, name)
        if original is None:
            raise KeyError(f"{name}: the key map does not name this parameter")
        return original

    def expand(self, num_layers: int) -> dict[str, str]:
        """Every original key -> our name, for a model of `num_layers` layers (layer-major, like a state dict)."""
        fixed = {self.prefix + k: v for k, v in self.table.items() if "{}" not in k}
        per_layer = [(k, v) for k, v in self.table.items() if "{}" in k]
        for i in range(num_layers):
            fixed.update({self.prefix + k.replace("{}", str(i)): v.replace("{}", str(i)) for k, v in per_layer})
        return fixed


class RegexKeyMap(KeyMap):
    """Ordered regex rules (full matches, without the prefix) to our names; the first that matches wins. Our names
    are written back unchanged under the prefix, so every name must read back through the rules as itself."""

    def __init__(self, prefix: str, rules: Iterable[tuple[str, str]], leave: tuple[str, ...] = (),
                 dropped: Mapping[str, str] | None = None):
        super().__init__(prefix, leave, dropped)
        self.rules = tuple((re.compile(pattern), target) for pattern, target in rules)

    def _ours(self, rest: str) -> str | None:
        for pattern, target in self.rules:
            match = pattern.fullmatch(rest)
            if match:
                return match.expand(target)
        return None

    def _original(self, name: str) -> str:
        return name


# ---------------------------------------------------------------------------------------------------- CPM-Bee
CPMBEE_KEY_MAP = TableKeyMap("llm.", {
    "input_embedding.weight": "embedding",
    "position_bias.relative_attention_bias": "position_bias",
    "encoder.output_layernorm.weight": "final_norm.weight",
    "encoder.layers.{}.self_att.layernorm_before_attention.weight": "layers.{}.attn_norm.weight",
    "encoder.layers.{}.self_att.self_attention.project_q.weight": "layers.{}.attn.q.weight",
    "encoder.layers.{}.self_att.self_attention.project_k.weight": "layers.{}.attn.k.weight",
    "encoder.layers.{}.self_att.self_attention.project_v.weight": "layers.{}.attn.v.weight",
    "encoder.layers.{}.self_att.self_attention.attention_out.weight": "layers.{}.attn.out.weight",
    "encoder.layers.{}.ffn.layernorm_before_ffn.weight": "layers.{}.ffn_norm.weight",
    "encoder.layers.{}.ffn.ffn.w_in.w_0.weight": "layers.{}.ffn.w_gate.weight",
    "encoder.layers.{}.ffn.ffn.w_in.w_1.weight": "layers.{}.ffn.w_up.weight",
    "encoder.layers.{}.ffn.ffn.w_out.weight": "layers.{}.ffn.w_down.weight",
})


# ------------------------------------------------------------------------------ VisCPM-Chat's vision side (BEiT-3)
# Keys of the original VLU_CPMBee state dict that we deliberately do not load (present or absent, both fine).
DROPPED_ORIGINAL_KEYS: dict[str, str] = {
    "vpm.mim_head.weight": "BEiT3Wrapper's masked-image-modelling head; never used for inference",
    "vpm.mim_head.bias": "BEiT3Wrapper's masked-image-modelling head; never used for inference",
    "vpm.beit3.vision_embed.mask_token": "only used for masked pre-training inputs",
    "vpm.beit3.text_embed.weight": "BEiT-3 text embedding; VisCPM only used it to initialise `query`",
}
# Keys the LLM loader handles.
IGNORED_ORIGINAL_PREFIXES: tuple[str, ...] = ("llm.",)

_BEIT3 = "vpm.beit3."
_WAYS = {"A": "image", "B": "query"}  # torchscale's multiway copies -> ours
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
_FFN_PARTS = {"fc1": "fc1", "ffn_layernorm": "norm", "fc2": "fc2"}  # after ffn.A / ffn.B

VISION_KEY_MAP = TableKeyMap("", {
    "query": "query",
    "mapping.0.weight": "mapping.fc1.weight",
    "mapping.0.bias": "mapping.fc1.bias",
    "mapping.2.weight": "mapping.fc2.weight",
    "mapping.2.bias": "mapping.fc2.bias",
    _BEIT3 + "vision_embed.proj.weight": "beit3.patch_embed.weight",
    _BEIT3 + "vision_embed.proj.bias": "beit3.patch_embed.bias",
    _BEIT3 + "vision_embed.cls_token": "beit3.cls_token",
    _BEIT3 + "encoder.embed_positions.A.weight": "beit3.pos_embed_image",
    _BEIT3 + "encoder.embed_positions.B.weight": "beit3.pos_embed_query",
    **{f"{_BEIT3}encoder.layer_norm.{way}.{wb}": f"beit3.final_norm.{ours}.{wb}"
       for way, ours in _WAYS.items() for wb in ("weight", "bias")},
    **{f"{_BEIT3}encoder.layers.{{}}.{theirs}.{way}.{wb}": f"beit3.layers.{{}}.{mine}.{ours}.{wb}"
       for theirs, mine in _LAYER_MULTIWAY.items() for way, ours in _WAYS.items() for wb in ("weight", "bias")},
    **{f"{_BEIT3}encoder.layers.{{}}.ffn.{way}.{theirs}.{wb}": f"beit3.layers.{{}}.ffn.{ours}.{mine}.{wb}"
       for theirs, mine in _FFN_PARTS.items() for way, ours in _WAYS.items() for wb in ("weight", "bias")},
}, leave=IGNORED_ORIGINAL_PREFIXES, dropped=DROPPED_ORIGINAL_KEYS)


# ------------------------------------------------------------------------------------------------ VisCPM-Paint
PAINT_PREFIXES = ("llm.", "trans_block.", "unet.", "vae.")  # every key of a Paint checkpoint starts with one

# CPM-Bee width -> UNet width (the original's CPMBeeTransBlock)
TRANS_BLOCK_KEY_MAP = TableKeyMap("trans_block.", {
    "w_out_res.weight": "proj.weight",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
})
# diffusers' own names
UNET_KEY_MAP = RegexKeyMap("unet.", ((r"(.+)", r"\1"),))


def vae_key_map(prefix: str = "") -> RegexKeyMap:
    """diffusers names (`vae.*` inside a checkpoint, none in a VAE file); the VAE attention names of older diffusers
    (<= 0.15, as on the hub) are read too."""
    return RegexKeyMap(prefix, (
        (r"(.*attentions\.\d+\.)query\.(weight|bias)", r"\1to_q.\2"),
        (r"(.*attentions\.\d+\.)key\.(weight|bias)", r"\1to_k.\2"),
        (r"(.*attentions\.\d+\.)value\.(weight|bias)", r"\1to_v.\2"),
        (r"(.*attentions\.\d+\.)proj_attn\.(weight|bias)", r"\1to_out.0.\2"),
        (r"(.+)", r"\1"),
    ))

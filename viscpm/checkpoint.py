"""Checkpoint reading and strict, reported loading.

The original VisCPM checkpoints are pickled state dicts (`.bin`/`.pt`) whose keys carry the original module
names (`llm.encoder.layers.0.self_att...`). We read them unchanged - with ``torch.load(weights_only=True,
mmap=True)`` so nothing executes and nothing is copied - or from safetensors, map every key through an explicit
table onto our module names, and load onto a model built on the ``meta`` device with ``assign=True``, so a 10B
model never exists twice in memory. Anything missing, unexpected or mis-shaped is an error that names the keys.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import CPMBeeConfig
    from .cpmbee import CPMBee
    from .tokenizer import CPMBeeTokenizer

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "viscpm_config.json"  # our model config, written by `python -m viscpm.convert`
VOCAB_FILE = "bee.txt"  # the CPM-Bee vocabulary, in the original's format
# Model folders shipped inside the package (`<name>/<kind>/`, kind = chat | paint), in the converted layout.
BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODELS = ("shapes",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message lists the offending keys."""


# ---- reading ------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file, a `.bin`/`.pt`/`.pth` pickle (weights only, memory-mapped),
    or a folder of safetensors shards with a ``model.safetensors.index.json``. Tensors stay on the CPU."""
    path = Path(path)
    if path.is_dir():
        index = path / SAFETENSORS_INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{path} is a folder without {SAFETENSORS_INDEX}")
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(path / shard))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # pre-1.6 (non-zip) pickles cannot be memory-mapped; they still load weights-only
            logger.warning("%s is a legacy pickle: loading it without mmap", path.name)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
        return dict(obj)
    raise CheckpointError(f"unsupported checkpoint format: {path.name} (expected .safetensors, .bin, .pt)")


def find_checkpoint(folder: Path, name: str | None = None, original_names: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> Path:
    """The weights in a model folder: `name` if given; else our converted shards (a folder with
    model.safetensors.index.json) or model.safetensors; else the first of `original_names` present; else the
    folder's only .pt/.bin/.pth/.safetensors file not named in `exclude`."""
    if name is not None:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {name} not found in {folder}")
        return path
    if (folder / SAFETENSORS_INDEX).is_file():
        return folder
    for candidate in ("model.safetensors", *original_names):
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in (".pt", ".bin", ".pth", ".safetensors") and p.name not in exclude)
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no unique checkpoint in {folder} (found {[p.name for p in found]}); name one explicitly")


def bundled_model_folder(name: str | Path, kind: str) -> Path | None:
    """The shipped folder of a bundled model name (`shapes`: small models trained on synthetic shapes, see
    tools/train_shapes.py) for `kind` chat/paint, or None when `name` is not one. They load like any converted
    checkpoint folder."""
    if str(name) not in BUNDLED_MODELS:
        return None
    folder = BUNDLED_DIR / str(name) / kind
    if not (folder / VOCAB_FILE).is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from {folder} (retrain: tools/train_shapes.py)")
    return folder


def open_model_folder(path: str | Path) -> tuple[Path, "CPMBeeTokenizer", dict | None]:
    """(folder, its tokenizer, its viscpm_config.json as a dict or None) for a model folder, with clear errors."""
    from .tokenizer import CPMBeeTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder} (or use the preset 'tiny')")
    if not (folder / VOCAB_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {VOCAB_FILE} (the CPM-Bee vocabulary)")
    config = folder / CONFIG_FILE
    return folder, CPMBeeTokenizer.from_file(folder / VOCAB_FILE), json.loads(config.read_text()) if config.is_file() else None


# ---- key maps -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyMap:
    """Ordered regex rules from original checkpoint keys (after ``prefix``) to our parameter names; a rule
    whose target is None drops the key on purpose."""

    prefix: str
    rules: tuple[tuple[str, str | None], ...]

    def map(self, key: str) -> tuple[bool, str | None]:
        """(matched, our name or None for a deliberate drop)."""
        if not key.startswith(self.prefix):
            return False, None
        rest = key[len(self.prefix) :]
        for pattern, target in self.rules:
            m = re.fullmatch(pattern, rest)
            if m:
                return True, (m.expand(target) if target is not None else None)
        return False, None


CPMBEE_KEY_MAP = KeyMap(
    prefix="llm.",
    rules=(
        (r"input_embedding\.weight", "embedding"),
        (r"position_bias\.relative_attention_bias", "position_bias"),
        (r"encoder\.output_layernorm\.weight", "final_norm.weight"),
        (r"encoder\.layers\.(\d+)\.self_att\.layernorm_before_attention\.weight", r"layers.\1.attn_norm.weight"),
        (r"encoder\.layers\.(\d+)\.self_att\.self_attention\.project_([qkv])\.weight", r"layers.\1.attn.\2.weight"),
        (r"encoder\.layers\.(\d+)\.self_att\.self_attention\.attention_out\.weight", r"layers.\1.attn.out.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.layernorm_before_ffn\.weight", r"layers.\1.ffn_norm.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.ffn\.w_in\.w_0\.weight", r"layers.\1.ffn.w_gate.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.ffn\.w_in\.w_1\.weight", r"layers.\1.ffn.w_up.weight"),
        (r"encoder\.layers\.(\d+)\.ffn\.ffn\.w_out\.weight", r"layers.\1.ffn.w_down.weight"),
    ),
)


def reverse_key_map(key_map: KeyMap, original_keys: list[str]) -> dict[str, str]:
    """Our name -> original name for the given original keys (to export in the original layout, and in tests)."""
    reverse: dict[str, str] = {}
    for key in original_keys:
        matched, ours = key_map.map(key)
        if matched and ours is not None:
            reverse[ours] = key
    return reverse


# ---- loading ------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load found. ``ok`` means every model parameter was provided exactly once with the right shape
    and every checkpoint key under the map's prefix was used or dropped on purpose."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model parameters the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (under the prefix) nothing maps
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"
    dropped: list[str] = field(default_factory=list)  # checkpoint keys ignored on purpose

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def raise_if_bad(self, what: str) -> None:
        if self.ok:
            return
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{name}: {shown}")
        raise CheckpointError(f"{what}: checkpoint does not match the model; " + "; ".join(parts))


def map_state_dict(
    state_dict: Mapping[str, torch.Tensor], key_map: KeyMap, expected: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename checkpoint keys onto our names and compare with the ``expected`` shapes of the model."""
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(key_map.prefix):
            continue
        matched, ours = key_map.map(key)
        if not matched:
            report.unexpected.append(key)
        elif ours is None:
            report.dropped.append(key)
        elif ours not in expected:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[ours]):
            report.mismatched.append(f"{key}: {tuple(tensor.shape)} vs {tuple(expected[ours])}")
        else:
            mapped[ours] = tensor
    report.missing = [k for k in expected if k not in mapped and not any(k in m for m in report.mismatched)]
    report.loaded = len(mapped)
    return mapped, report


def load_into(
    build: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build a module on the meta device, load the mapped weights by assignment (no second copy), then cast
    and move once. Raises CheckpointError on any missing/unexpected/mis-shaped key."""
    with torch.device("meta"):
        module = build()
    expected = {k: v.shape for k, v in module.state_dict().items()}
    mapped, report = map_state_dict(state_dict, key_map, expected)
    report.raise_if_bad(what)
    module.load_state_dict(mapped, strict=True, assign=True)
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    logger.info("%s: loaded %d tensors (%d dropped on purpose)", what, report.loaded, len(report.dropped))
    return module, report


def load_cpmbee(
    state_dict: Mapping[str, torch.Tensor],
    config: "CPMBeeConfig",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple["CPMBee", LoadReport]:
    """CPM-Bee from the `llm.*` keys of an original Chat/Paint state dict (other keys are left alone)."""
    from .cpmbee import CPMBee

    return load_into(lambda: CPMBee(config), state_dict, CPMBEE_KEY_MAP, "CPM-Bee", device, dtype)


def cpmbee_original_keys(config: "CPMBeeConfig") -> list[str]:
    """Every `llm.*` key of an original checkpoint for this config (for export and for tests)."""
    keys = ["llm.input_embedding.weight", "llm.position_bias.relative_attention_bias", "llm.encoder.output_layernorm.weight"]
    for i in range(config.num_layers):
        p = f"llm.encoder.layers.{i}."
        keys += [p + "self_att.layernorm_before_attention.weight"]
        keys += [p + f"self_att.self_attention.project_{x}.weight" for x in "qkv"]
        keys += [p + "self_att.self_attention.attention_out.weight", p + "ffn.layernorm_before_ffn.weight"]
        keys += [p + f"ffn.ffn.{x}.weight" for x in ("w_in.w_0", "w_in.w_1", "w_out")]
    return keys

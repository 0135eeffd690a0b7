"""Checkpoint reading, dtypes, and strict, reported loading.

The original VisCPM checkpoints are pickled state dicts (`.bin`/`.pt`) whose keys carry the original module
names (`llm.encoder.layers.0.self_att...`). We read them unchanged - with ``torch.load(weights_only=True,
mmap=True)`` so nothing executes and nothing is copied - or from safetensors, map every key through the explicit
key map of its part (`viscpm.keymaps`) onto our module names, and load onto a model built on the ``meta`` device
with ``assign=True``, so a 10B model never exists twice in memory. Every load returns a `LoadReport`; anything
missing, unexpected or mis-shaped raises `CheckpointError`, which names the keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import DTYPES
from .folders import (
    CONFIG_FILE,
    SAFETENSORS_INDEX,
    VAE_FILE,
    VAE_FOLDER,
    VOCAB_FILE,
    model_folder_problem,
    pick_checkpoint,
)
from .keymaps import CPMBEE_KEY_MAP, KeyMap

if TYPE_CHECKING:
    from .config import CPMBeeConfig, PaintConfig
    from .cpmbee import CPMBee
    from .tokenizer import CPMBeeTokenizer

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message lists the offending keys; `report` (when the error comes
    from a load) holds them all."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    @property
    def missing(self) -> list[str]:
        return self.report.missing if self.report else []

    @property
    def unexpected(self) -> list[str]:
        return self.report.unexpected if self.report else []

    @property
    def mismatched(self) -> list[str]:
        return self.report.mismatched if self.report else []


def torch_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """A dtype name of `DTYPES` (or a torch dtype) as a torch dtype. None: the default for `device`, bfloat16 on
    CUDA and float32 elsewhere (float32 when no device is given)."""
    if dtype is None:
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def vae_dtype(config: PaintConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype of Paint's VAE for a model in `dtype`: SD's VAE overflows in fp16 at large sizes (diffusers marks it
    force_upcast), so fp16 becomes fp32; bf16 is fine."""
    if dtype == torch.float16 and config.vae.get("force_upcast", True):
        return torch.float32
    return dtype


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
    """The weights in a model folder (the rules: `viscpm.folders.pick_checkpoint`)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    picked = pick_checkpoint(names, str(folder), name, original_names, exclude)
    return folder if picked is None else folder / picked


def open_model_folder(path: str | Path, kind: str = "chat", checkpoint: str | None = None
                      ) -> tuple[Path, "CPMBeeTokenizer", dict | None]:
    """(folder, its tokenizer, its viscpm_config.json as a dict or None) for a model folder, with clear errors."""
    from .tokenizer import CPMBeeTokenizer

    folder = Path(path)
    top = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else None
    problem = model_folder_problem(kind, top, str(folder), checkpoint)
    if problem:
        raise FileNotFoundError(problem)
    config = folder / CONFIG_FILE
    return folder, CPMBeeTokenizer.from_file(folder / VOCAB_FILE), json.loads(config.read_text()) if config.is_file() else None


def read_vae(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(VAE state dict, its config or None) from `vae/` (diffusers layout) or `vae.safetensors` in `folder`."""
    sub = folder / VAE_FOLDER
    if sub.is_dir():
        config = json.loads((sub / "config.json").read_text()) if (sub / "config.json").is_file() else None
        for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (sub / weights).is_file():
                return read_state_dict(sub / weights), config
        raise FileNotFoundError(f"{sub} has no diffusion_pytorch_model.safetensors/.bin")
    if (folder / VAE_FILE).is_file():
        return read_state_dict(folder / VAE_FILE), None
    raise CheckpointError(f"no VAE in {folder}: expected a diffusers '{VAE_FOLDER}/' folder, '{VAE_FILE}', "
                          "or vae.* keys in the checkpoint")


# ---- loading ------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did with each checkpoint key (original names, sorted). ``ok`` means every model parameter was
    provided exactly once with the right shape and every key of the part was loaded or dropped on purpose."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # keys the model needs and the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # keys of the part that no rule maps onto the model
    mismatched: list[str] = field(default_factory=list)  # "key (checkpoint shape) != expected (model shape)"
    dropped: list[str] = field(default_factory=list)  # keys present and ignored on purpose
    ignored: list[str] = field(default_factory=list)  # keys of other parts, left to their loaders
    absent_dropped: list[str] = field(default_factory=list)  # keys ignored on purpose that were not there
    model_names: dict[str, str] = field(default_factory=dict, repr=False)  # missing key -> our parameter name

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def raise_if_bad(self, what: str) -> None:
        if self.ok:
            return
        # a missing key is shown under our name first: that is what a config mismatch changes
        missing = [k if self.model_names.get(k, k) == k else f"{self.model_names[k]} (checkpoint key {k})"
                   for k in self.missing]
        parts = []
        for name, keys in (("missing", missing), ("unexpected", self.unexpected), ("mis-shaped", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{name}: {shown}")
        raise CheckpointError(f"{what}: checkpoint does not match the model; " + "; ".join(parts), self)


def map_state_dict(
    state_dict: Mapping[str, torch.Tensor], key_map: KeyMap, expected: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename the checkpoint keys of `key_map`'s part onto our names and compare with the ``expected`` shapes."""
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    provided: set[str] = set()
    for key, tensor in state_dict.items():
        if not key_map.owns(key):
            report.ignored.append(key)
            continue
        if key in key_map.dropped:
            report.dropped.append(key)
            continue
        ours = key_map.to_ours(key)
        if ours is None or ours not in expected:
            report.unexpected.append(key)
            continue
        provided.add(ours)
        if tuple(tensor.shape) != tuple(expected[ours]):
            report.mismatched.append(f"{key} {tuple(tensor.shape)} != expected {tuple(expected[ours])}")
        else:
            mapped[ours] = tensor
            report.loaded.append(key)
    for name in expected:
        if name not in provided:
            try:
                key = key_map.to_original(name)
            except KeyError:  # the module has a parameter the map cannot name: the map is out of date
                raise RuntimeError(f"key map out of sync with the module: no original key for {name}") from None
            report.missing.append(key)
            report.model_names[key] = name
    report.absent_dropped = sorted(set(key_map.dropped) - set(report.dropped))
    for keys in (report.loaded, report.missing, report.unexpected, report.mismatched, report.dropped, report.ignored):
        keys.sort()
    return mapped, report


def load_state_dict_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    what: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadReport:
    """Load `key_map`'s part of an original-key checkpoint into `module`, strictly. A module on the ``meta`` device
    gets the checkpoint tensors assigned (no second copy); a materialised one is copied into. Then the module is
    cast to `dtype` (None: keep the tensors' dtype) and moved to `device` (None: leave it) once. Raises
    CheckpointError naming every missing, unexpected or mis-shaped key."""
    targets = module.state_dict()
    mapped, report = map_state_dict(state_dict, key_map, {k: v.shape for k, v in targets.items()})
    report.raise_if_bad(what)
    module.load_state_dict(mapped, strict=True, assign=any(t.is_meta for t in targets.values()))
    if dtype is not None:
        module.to(device=device, dtype=dtype)
    elif device is not None:
        module.to(device=device)
    logger.info("%s: loaded %d tensors (%d dropped on purpose, %d left to other loaders)", what, len(report.loaded),
                len(report.dropped), len(report.ignored))
    return report


def load_into(
    build: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build a module on the meta device and load it (see `load_state_dict_into`): the weights exist once."""
    with torch.device("meta"):
        module = build()
    return module, load_state_dict_into(module, state_dict, key_map, what, device, dtype)


def original_state_dict(module: nn.Module, key_map: KeyMap) -> dict[str, torch.Tensor]:
    """The module's weights under their original checkpoint names (keys dropped on purpose are absent)."""
    return {key_map.to_original(name): tensor for name, tensor in module.state_dict().items()}


def check_parts(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], what: str) -> None:
    """Every key of a checkpoint belongs to one of its parts (starts with one of their `prefixes`); any other key
    raises CheckpointError."""
    unknown = sorted(k for k in state_dict if not k.startswith(prefixes))
    if unknown:
        LoadReport(unexpected=unknown).raise_if_bad(what)


def reverse_key_map(key_map: KeyMap, original_keys: list[str]) -> dict[str, str]:
    """Our name -> original name for the given original keys of `key_map`'s part."""
    reverse: dict[str, str] = {}
    for key in original_keys:
        ours = key_map.to_ours(key) if key_map.owns(key) else None
        if ours is not None:
            reverse[ours] = key
    return reverse


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
    return list(CPMBEE_KEY_MAP.expand(config.num_layers))

"""Convert an original VisCPM checkpoint into a model folder of safetensors shards.

    python -m viscpm.convert chat  SRC DST [--vocab bee.txt] [--shard-size 2GB] [--dtype bfloat16]
    python -m viscpm.convert paint SRC DST [...]        # the VAE (vae/ or vae.safetensors) must sit next to SRC

SRC is the original `.pt`/`.bin` (or a folder holding it and `bee.txt`). DST receives
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (keys keep their original names, so the same
strict key maps load them), `viscpm_config.json` and `bee.txt`. Workers then load by memory map, without
unpickling. The checkpoint is validated against the model before anything is written; keys the model drops on
purpose (e.g. BEiT-3's unused `mim_head`) are not copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX, find_checkpoint, read_state_dict, read_vae, torch_dtype
from .folders import VAE_FILE
from .config import ChatConfig, PaintConfig

logger = logging.getLogger(__name__)


def _parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_shards(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> list[str]:
    """Write `state` as safetensors shards of at most ~shard_bytes each plus the HF-style index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def remove_stale_weights(folder: Path, keep: list[str]) -> list[str]:
    """Delete the weights an earlier conversion into `folder` left (other shards, a single model.safetensors): the
    index names only the new shards, but stale files would still be read by anything that globs the folder."""
    stale = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.name not in keep and (SHARD_NAME.fullmatch(p.name) or p.name == "model.safetensors"))
    for name in stale:
        (folder / name).unlink()
    if stale:
        logger.warning("removed %d weight file(s) of an earlier conversion from %s: %s", len(stale), folder, stale)
    return stale


def _chat(state: dict[str, torch.Tensor], tokenizer_path: Path, config_dict: dict | None, src_dir: Path) -> tuple[dict, set[str]]:
    """Validate a Chat state dict against the model (default: the real VisCPM-Chat); returns (config, keys to keep)."""
    from .chat import ChatModel
    from .tokenizer import CPMBeeTokenizer

    config = ChatConfig.from_saved(config_dict)
    # a meta-device build checks every key and shape without allocating a 10B model
    model = ChatModel.from_state_dict(state, config, CPMBeeTokenizer.from_file(tokenizer_path), device="meta")
    dropped = {key for report in model.load_reports.values() for key in report.dropped}
    return config.to_dict(), set(state) - dropped


def _paint(state: dict[str, torch.Tensor], tokenizer_path: Path, config_dict: dict | None, src_dir: Path) -> tuple[dict, set[str]]:
    """Validate a Paint checkpoint (`trans_block.*`, `unet.*`, `llm.*`) and bring its VAE along as `vae.*` keys:
    the original checkpoint has no VAE, so it must sit next to SRC as `vae/` (diffusers layout) or vae.safetensors."""
    from dataclasses import replace

    from .paint import validate_paint_checkpoint

    config = PaintConfig.from_dict(config_dict) if config_dict else PaintConfig()
    if not any(k.startswith("vae.") for k in state):
        vae_state, vae_config = read_vae(src_dir)
        if vae_config is not None:
            config = replace(config, vae=vae_config)
        state.update({f"vae.{k}": v for k, v in vae_state.items()})
    validate_paint_checkpoint(state, config)
    return config.to_dict(), set(state)


CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], Path, dict | None, Path], tuple[dict, set[str]]]] = {
    "chat": _chat,
    "paint": _paint,
}


def convert(kind: str, src: Path, dst: Path, vocab: Path | None = None, shard_bytes: int = 2 << 30,
            dtype: torch.dtype | None = None, config: Path | None = None) -> Path:
    """`config`: a viscpm_config.json for non-default model sizes (default: one next to SRC, else the real model)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown model kind {kind!r}; one of {sorted(CONVERTERS)}")
    checkpoint = find_checkpoint(src, exclude=(VAE_FILE,)) if src.is_dir() else src
    vocab = vocab or (src if src.is_dir() else src.parent) / "bee.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"vocabulary {vocab} not found; pass --vocab path/to/bee.txt")
    config = config or (src if src.is_dir() else src.parent) / "viscpm_config.json"
    config_dict = json.loads(config.read_text()) if config.is_file() else None
    state = read_state_dict(checkpoint)
    config_dict, keep = CONVERTERS[kind](state, vocab, config_dict, src if src.is_dir() else src.parent)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items() if k in keep}
    dst.mkdir(parents=True, exist_ok=True)
    names = save_shards(state, dst, shard_bytes)
    remove_stale_weights(dst, keep=names)
    (dst / "viscpm_config.json").write_text(json.dumps(config_dict, indent=1))
    shutil.copyfile(vocab, dst / "bee.txt")
    logger.info("wrote %d tensors in %d shard(s) to %s", len(state), len(names), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m viscpm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="which VisCPM model the checkpoint holds")
    parser.add_argument("src", type=Path, help="original checkpoint file, or a folder holding it and bee.txt")
    parser.add_argument("dst", type=Path, help="output model folder")
    parser.add_argument("--vocab", type=Path, default=None, help="bee.txt (default: next to the checkpoint)")
    parser.add_argument("--config", type=Path, default=None,
                        help="viscpm_config.json describing a non-default model size (default: the real model)")
    parser.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 500MB, 2GB")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="cast floating-point weights (default: keep the checkpoint's dtype)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(args.kind, args.src, args.dst, args.vocab, _parse_size(args.shard_size),
                torch_dtype(args.dtype) if args.dtype else None, args.config)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a model folder must hold, as names only, and the image size a Chat folder's config names (torch-free).

The loaders (`ChatModel.from_pretrained`, `PaintModel.from_pretrained`, `viscpm.safety`) and a job's driver-side
check use the same rules, so a folder that passes the check is one the loader can open, and a folder that fails
gets the loader's own message - in seconds, before any GPU is reserved. The rules work on a list of relative
file names, so the caller may list a local folder or an object-store prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

from .config import ChatConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "viscpm_config.json"  # our model config, written by `python -m viscpm.convert`
VOCAB_FILE = "bee.txt"  # the CPM-Bee vocabulary, in the original's format
WEIGHT_SUFFIXES = (".pt", ".bin", ".pth", ".safetensors")
ORIGINAL_CHAT_CHECKPOINTS = ("viscpm_chat_balance_checkpoint.pt", "viscpm_chat_zhplus_checkpoint.pt",
                             "pytorch_model.v1.bin")
ORIGINAL_PAINT_CHECKPOINTS = ("pytorch_model.v1.bin",)
VAE_FOLDER = "vae"
VAE_FILE = "vae.safetensors"
# models built in code (`tiny`) or shipped in the package (`shapes`), not read from a user's folder
MODEL_PRESETS = ("tiny", "shapes")
# shipped model folders (`<name>/<kind>/`, kind = chat | paint), in the converted layout; tools/train_shapes.py
BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODELS = ("shapes",)
# optional components (transformers/diffusers folders, `viscpm.safety`): the files a loader needs besides weights
COMPONENT_FILES = {
    "component": (("config.json", "expected a transformers/diffusers model folder"),),
    "image-safety": (("config.json", "expected a transformers/diffusers model folder"),
                     ("preprocessor_config.json", "the CLIP image processor")),
}
MODEL_KINDS = ("chat", "paint")


def pick_checkpoint(names: Iterable[str], where: str, name: str | None = None, original_names: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> str | None:
    """The weights among the top-level file `names` of a model folder: `name` if given; else our converted shards
    (None: the folder itself, it holds model.safetensors.index.json) or model.safetensors; else the first of
    `original_names` present; else the only weights file not named in `exclude`. Raises FileNotFoundError."""
    present = set(names)
    if name is not None:
        if name not in present:
            raise FileNotFoundError(f"checkpoint {name} not found in {where}")
        return name
    if SAFETENSORS_INDEX in present:
        return None
    for candidate in ("model.safetensors", *original_names):
        if candidate in present:
            return candidate
    found = sorted(n for n in present if n.endswith(WEIGHT_SUFFIXES) and n not in exclude)
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no unique checkpoint in {where} (found {found}); name one explicitly")


def model_folder_problem(kind: str, files: Iterable[str] | None, where: str, checkpoint: str | None = None
                         ) -> str | None:
    """Why the folder whose files (relative paths, `/`-separated) are `files` cannot be loaded as `kind` (`chat`,
    `paint`, `component` - a safety checker or reranker folder - or `image-safety`: a component with its image
    processor); None when it looks loadable. `files`
    None: the folder does not exist. `checkpoint`: the weights file named explicitly."""
    if files is None:
        hint = f" (or use the preset {MODEL_PRESETS[0]!r})" if kind in MODEL_KINDS else ""
        what = "model folder" if kind in MODEL_KINDS else "component folder"
        return f"{what} not found: {where}{hint}"
    top = {f for f in files if "/" not in f}
    if kind in COMPONENT_FILES:
        for needed, why in COMPONENT_FILES[kind]:
            if needed not in top:
                return f"{where} has no {needed} ({why})"
        return None
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {[*MODEL_KINDS, *COMPONENT_FILES]}")
    if VOCAB_FILE not in top:
        return f"{where} has no {VOCAB_FILE} (the CPM-Bee vocabulary)"
    originals = ORIGINAL_CHAT_CHECKPOINTS if kind == "chat" else ORIGINAL_PAINT_CHECKPOINTS
    try:
        pick_checkpoint(top, where, checkpoint, originals, exclude=(VAE_FILE,) if kind == "paint" else ())
    except FileNotFoundError as exc:
        return str(exc)
    return None


def bundled_model_folder(name: object, kind: str) -> Path | None:
    """The shipped folder of a bundled model (`shapes`: small models trained on synthetic shapes) for `kind`
    chat/paint, or None when `name` is not one. It loads like any converted checkpoint folder."""
    if str(name) not in BUNDLED_MODELS:
        return None
    folder = BUNDLED_DIR / str(name) / kind
    if not (folder / VOCAB_FILE).is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from {folder} (retrain: tools/train_shapes.py)")
    return folder


def chat_image_size(path_or_preset: str | PathLike[str]) -> int:
    """The side in pixels of the square images a Chat model's encoder takes (`ChatConfig.image_size`), known without
    reading weights: `tiny`'s preset, else the `viscpm_config.json` of the model's folder (bundled or given) - a
    folder without one holds an original checkpoint, the real model's 224. FileNotFoundError: no such folder."""
    name = str(path_or_preset)
    if name == "tiny":  # built in code (ChatModel.tiny)
        return ChatConfig.from_name(name).image_size
    folder = bundled_model_folder(name, "chat") or Path(path_or_preset)
    if not folder.is_dir():
        raise FileNotFoundError(model_folder_problem("chat", None, str(folder)))
    config = folder / CONFIG_FILE
    saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    return ChatConfig.from_saved(saved).image_size

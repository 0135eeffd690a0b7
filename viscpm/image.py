"""Image conversions: preprocessing for VisCPM-Chat's BEiT-3 encoder (``to_rgb``, ``model_input_image``,
``preprocess_images``) and VisCPM-Paint's decoded floats to bytes (``to_uint8``).

The original pipeline (``VisCPM.utils.utils.build_transform(is_train=False)``) is, on a PIL image:
``Resize((224, 224), BICUBIC)`` -> ``ToTensor`` -> ``Normalize(mean=0.5, std=0.5)``. For a PIL input torchvision's
Resize is exactly ``PIL.Image.resize((w, h), BICUBIC)`` (PIL's resampling filter is itself antialiasing), so this
module needs only PIL + numpy + torch and reproduces the original bit for bit on RGB images.

The original callers hand over ``Image.open(...).convert('RGB')``. We accept any PIL mode and make RGB ourselves:

* ``RGB``: used as is (this is the parity path; a ``transparency`` entry in ``info`` is ignored, as
  ``convert('RGB')`` ignores it).
* modes with alpha (``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``) and ``P``/``L`` images with a ``transparency``
  entry: composited onto an opaque ``background`` (default WHITE; transparent pixels of logos / scanned documents
  are meant to be the page colour, and white keeps dark strokes visible). ``convert('RGB')`` would instead expose
  whatever colour is stored under alpha 0 (often black).
* 16/32-bit integer modes (``I;16*``, ``I``): PIL's ``convert('RGB')`` clips these at 255, which turns almost every
  16-bit image white. We rescale 16-bit data to 8 bit (``round(v / 257)``); an ``I`` image whose values all fit in
  0..255 is taken as 8-bit data, otherwise as 16-bit.
* ``F``: taken on PIL's 0..255 scale, rounded and clipped (PIL would truncate).
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``, ...): ``convert('RGB')``.

EXIF orientation is NOT applied (the original does not either); callers that want it use
``PIL.ImageOps.exif_transpose`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where tensors are made: decode workers only need to_rgb
    import torch

logger = logging.getLogger(__name__)

# timm's IMAGENET_INCEPTION_MEAN / _STD, used by build_transform.
IMAGENET_INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32L", "I;32B"})


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _wide_int_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
        eight_bit = values  # an 8-bit image stored in a 32-bit container
    else:
        eight_bit = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(eight_bit), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return an RGB version of ``image`` (see the module docstring for the per-mode rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "La":  # premultiplied: PIL only converts it to LA
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES or (mode in ("P", "L") and "transparency" in image.info):
        return _composite(image.convert("RGBA"), background)
    if mode in _WIDE_INT_MODES:
        return _wide_int_to_l(image).convert("RGB")
    if mode == "F":
        values = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(np.nan_to_num(values).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def model_input_image(image: Image.Image, size: int = 224,
                      background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` as the encoder sees it before normalising: RGB (``to_rgb``), resized to (size, size) with PIL's
    BICUBIC. ``preprocess_images`` goes through here, so a caller that resizes early (a decode worker) hands over
    the very pixels the model would have made; resizing the result again is a copy (PIL returns ``copy()`` when the
    size already matches, as torchvision's Resize returns the image unchanged)."""
    return to_rgb(image, background).resize((size, size), Image.Resampling.BICUBIC)


def preprocess_images(
    images: Sequence[Image.Image],
    size: int = 224,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    mean: Sequence[float] = IMAGENET_INCEPTION_MEAN,
    std: Sequence[float] = IMAGENET_INCEPTION_STD,
) -> torch.Tensor:
    """PIL images of any mode/size -> normalised pixel values, float32 (B, 3, size, size) on CPU.

    Same arithmetic as torchvision's ToTensor + Normalize (uint8 -> float32 / 255, then (x - mean) / std in
    float32), so RGB inputs give exactly the reference pixel values.
    """
    import torch

    if len(images) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(model_input_image(image, size, background))
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 with round-half-even, as the original's numpy_to_pil."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().float().cpu().numpy()
    return (np.asarray(images, dtype=np.float32) * 255).round().astype(np.uint8)

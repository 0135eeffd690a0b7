"""The product's numeric promises (README, "Seeds and reproducibility") as test helpers, so that every test compares
at the tolerance the product documents and no tighter: the suite must pass on any x86-64 CPU torch supports
(AVX-512, AVX2, the DEFAULT baseline), whose GEMM kernels round a row differently depending on where it sits in a
batch.

- The same call with the same batch on the same machine: bitwise (deterministic kernels, same shapes).
- An image rendered in a batch vs alone (another batch composition): within PIXEL_LEVELS uint8 levels.
- One image per model call (`--bitwise-reproducible`, `batch_size=1`): bitwise, whatever else is rendered.
"""

from __future__ import annotations

import numpy as np

# README: "each image within 2 uint8 levels of itself alone, bitwise with --bitwise-reproducible"
PIXEL_LEVELS = 2


def pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest per-value difference of two uint8 images, in levels."""
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def assert_pixels_within(a: np.ndarray, b: np.ndarray, what: str, levels: int = PIXEL_LEVELS) -> None:
    """The batched-vs-alone promise: no value moves by more than `levels`."""
    diff = pixel_diff(a, b)
    assert diff <= levels, f"{what}: max pixel diff {diff} > {levels} uint8 levels"


def assert_different_pictures(a: np.ndarray, b: np.ndarray, what: str, min_mean_levels: float = 8.0) -> None:
    """Two images that should be different pictures (other seed, other scheduler) differ by far more than rounding:
    a mean difference of many levels, not a few values off by the tolerance."""
    mean = float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())
    assert mean >= min_mean_levels, f"{what}: mean pixel diff {mean:.2f} < {min_mean_levels} levels"

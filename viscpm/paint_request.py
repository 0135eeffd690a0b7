"""The checks of a `PaintModel.generate` request, apart from the model (paint.py stays one readable file):
prompts, negative prompts, seeds (drawn when not given), images per prompt, output kind, batch size."""

from __future__ import annotations

import random

import numpy as np

OUTPUTS = ("pil", "np")


def check_paint_request(prompts, negative_prompts, seeds, images_per_prompt, output, batch_size
                        ) -> tuple[list[str], list[str], list[int]]:
    """(prompts, one negative per prompt ("" for none), one seed per image); descriptive ValueErrors."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of str, not one str (wrap it in a list)")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be str, got {type(p).__name__}")
    n = len(prompts)
    if negative_prompts is None or isinstance(negative_prompts, str):
        negatives = [negative_prompts or ""] * n
    else:
        negatives = ["" if x is None else x for x in negative_prompts]
        if len(negatives) != n:
            raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
        for i, x in enumerate(negatives):
            if not isinstance(x, str):
                raise ValueError(f"negative prompt {i} must be str or None, got {type(x).__name__}")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    total = n * images_per_prompt
    if seeds is None:
        rng = random.SystemRandom()
        image_seeds = [rng.randrange(2**63) for _ in range(total)]
    else:
        seeds = list(seeds)
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
                raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
        if len(seeds) == total:
            image_seeds = [int(s) for s in seeds]
        elif len(seeds) == n:
            image_seeds = [int(s) + j for s in seeds for j in range(images_per_prompt)]
        else:
            raise ValueError(f"need one seed per image ({total}) or per prompt ({n}), got {len(seeds)}")
    return prompts, negatives, image_seeds

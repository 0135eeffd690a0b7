"""Paint renders a whole model batch in one UNet call per denoising step whatever its prompts' lengths: the text
states are padded to the longest pair and masked per image, so each image stays what it is alone."""

from __future__ import annotations

import numpy as np
import pytest

from numeric import assert_pixels_within
from viscpm import PaintModel, SamplingConfig

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

FAST = SamplingConfig(num_inference_steps=2, height=32, width=32)
ONE_STEP = SamplingConfig(num_inference_steps=1, height=32, width=32)
PROMPTS = ["a cat", "一只猫", "a red bicycle leaning on a brick wall in the evening sun, photorealistic, 4k",
           "山水画，远处有雪山，近处有小船和渔夫，水墨风格", "dog", "星空", "an astronaut riding a horse on the moon",
           "a bowl of fruit"]


@pytest.fixture(scope="module")
def model() -> PaintModel:
    return PaintModel.from_pretrained("tiny")


class CountingUNet:
    def __init__(self, unet) -> None:
        self.unet, self.batches = unet, []

    def __call__(self, sample, *args, **kwargs):
        self.batches.append(sample.shape[0])
        return self.unet(sample, *args, **kwargs)


def test_one_unet_call_per_step_and_each_image_as_alone(model: PaintModel) -> None:
    encoded = model.encode_texts(PROMPTS)
    assert len({e.length for e in encoded}) >= 4  # the prompts really differ in length
    counter = CountingUNet(model.unet)
    model._unet_fn = counter
    try:
        batched = model.generate(PROMPTS, seeds=list(range(8)), sampling=FAST, output="np", batch_size=8)
    finally:
        model._unet_fn = model.unet
    assert counter.batches == [16] * FAST.num_inference_steps  # 8 images x (cond, uncond), one call per step
    for i in (0, 2, 3, 5):  # short and long, en and zh
        prompt = PROMPTS[i]
        alone = model.generate([prompt], seeds=[i], sampling=FAST, output="np")[0].image
        assert_pixels_within(batched[i].image, alone, f"prompt {i} in a batch of 8 vs alone")


def test_one_image_per_call_is_bitwise_what_it_is_alone(model: PaintModel) -> None:
    """--bitwise-reproducible's promise: at batch_size 1 an image's bytes do not depend on the other prompts."""
    batched = model.generate(PROMPTS[:3], seeds=[5, 6, 7], sampling=FAST, output="np", batch_size=1)
    for i in (1, 2):
        alone = model.generate([PROMPTS[i]], seeds=[5 + i], sampling=FAST, output="np")[0].image
        assert np.array_equal(batched[i].image, alone)


def test_negative_prompt_is_encoded_once_across_calls(model: PaintModel) -> None:
    calls: list[list[str]] = []
    encode = model.encode_texts
    model.encode_texts = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)  # type: ignore[method-assign]
    try:
        model.generate(["a house"], negative_prompts="blurry", seeds=[1], sampling=ONE_STEP)
        model.generate(["a tree"], negative_prompts="blurry", seeds=[1], sampling=ONE_STEP)
    finally:
        del model.encode_texts
    assert calls == [["blurry"], ["a house"], ["a tree"]]  # the negative alone (its cached numbers are its own)


def test_the_prompts_of_a_batch_share_one_cpm_bee_forward(model: PaintModel) -> None:
    rows: list[int] = []
    hook = model.llm.register_forward_hook(lambda module, args, output: rows.append(args[0].batch_size))
    try:
        model.generate(PROMPTS, negative_prompts="ugly", seeds=list(range(8)), sampling=ONE_STEP, batch_size=8)
        model.generate(PROMPTS, negative_prompts="ugly", seeds=list(range(8)), sampling=ONE_STEP, batch_size=3)
        model.generate(PROMPTS[:2], negative_prompts="ugly", seeds=[0, 1], sampling=ONE_STEP, batch_size=1)
    finally:
        hook.remove()
    # batch 8: the negative (alone, then cached) + the 8 prompts in one forward; batch 3: 3 + 3 + 2; batch 1: alone
    assert rows == [1, 8, 3, 3, 2, 1, 1]


def test_paint_from_pretrained_compile_flag() -> None:
    model = PaintModel.from_pretrained("tiny", compile=True)
    assert model._unet_fn is not model.unet
    assert set(model.original_state_dict()) == set(PaintModel.from_pretrained("tiny").original_state_dict())

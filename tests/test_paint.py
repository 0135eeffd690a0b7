"""VisCPM-Paint on the tiny random model: batching, seeds, schedulers, validation, checkpoint folders."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from numeric import assert_different_pictures, assert_pixels_within
from viscpm.checkpoint import CheckpointError
from viscpm.inputs import build_paint_sample, collate
from viscpm.paint import (
    PaintConfig,
    PaintModel,
    SamplingConfig,
    candidate_seed,
    find_paint_checkpoint,
    make_scheduler,
    validate_paint_checkpoint,
)

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

# small and fast: 32x32 images (16x16 latents), a few steps
FAST = SamplingConfig(num_inference_steps=3, height=32, width=32)


@pytest.fixture(scope="module")
def model() -> PaintModel:
    return PaintModel.tiny()


def _images(results) -> list[np.ndarray]:
    return [np.asarray(r.image, dtype=np.int16) for r in results]


# ---- basics ------------------------------------------------------------------------------------------------
def test_tiny_generates_native_size_pil(model):
    results = model.generate(["a cat on a table"], seeds=[1], sampling=SamplingConfig(num_inference_steps=2))
    (r,) = results
    assert isinstance(r.image, Image.Image) and r.image.size == (64, 64) and r.image.mode == "RGB"
    assert (r.prompt_index, r.seed, r.nsfw, r.rerank_score, r.prompt_flagged) == (0, 1, None, None, None)


def test_same_seed_same_image_and_seeds_matter(model):
    """Two rows of one batch with the same prompt and seed are the same picture within the documented tolerance
    (the CPU's GEMM kernels may round a row by where it sits in the batch: AVX2 does, by a level); one image per
    call (what --bitwise-reproducible does) is bitwise; another seed is another picture."""
    a, b, c = model.generate(["a dog"] * 3, seeds=[5, 5, 6], sampling=FAST, output="np")
    assert a.image.dtype == np.uint8 and a.image.shape == (32, 32, 3)
    assert_pixels_within(a.image, b.image, "same prompt and seed, rows 0 and 1 of one batch")
    assert_different_pictures(a.image, c.image, "seed 5 vs seed 6")
    one, two = model.generate(["a dog"] * 2, seeds=[5, 5], sampling=FAST, output="np", batch_size=1)
    assert np.array_equal(one.image, two.image)


def test_tiny_is_deterministic_across_builds():
    a = PaintModel.tiny().generate(["sky"], seeds=[3], sampling=FAST, output="np")[0].image
    b = PaintModel.tiny().generate(["sky"], seeds=[3], sampling=FAST, output="np")[0].image
    assert np.array_equal(a, b)


# ---- batching --------------------------------------------------------------------------------------------
def test_padding_state_is_one_vector_for_every_text(model):
    """The shortcut behind batching: CPM-Bee's output at a padding position does not depend on the text, so a
    text encoded once can be padded to any length exactly as the original's padded forward."""
    texts = ["a red car on a mountain road", "", "猫"]
    encoded = model.encode_texts(texts)
    pads = torch.stack([e.hidden[-1] for e in encoded])
    torch.testing.assert_close(pads, pads[:1].expand_as(pads), rtol=0, atol=1e-6)
    for text, enc in zip(texts, encoded):
        sample = build_paint_sample(model.tokenizer, text)
        length = len(sample) + 7
        inputs, _ = collate([sample], pad_to=length)
        _, hidden = model.llm(inputs, return_logits=False)
        torch.testing.assert_close(enc.padded_hidden(length), hidden[0], rtol=0, atol=1e-5)


def test_image_does_not_depend_on_the_batch(model):
    """Each image of a 4-image batch (different prompts, lengths, negative prompts) equals the image made alone;
    two prompts share a text length so they run in one UNet batch; batch_size splits too."""
    prompts = ["a cat", "a dog", "a red car on a long mountain road, oil painting", "一只猫"]
    assert len(build_paint_sample(model.tokenizer, "a cat")) == len(build_paint_sample(model.tokenizer, "a dog"))
    negatives = [None, "blurry", None, "low quality"]
    seeds = [11, 12, 13, 14]
    for batch_size in (8, 3):
        batch = model.generate(prompts, negatives, seeds, FAST, output="np", batch_size=batch_size)
        for i, r in enumerate(batch):
            alone = model.generate([prompts[i]], [negatives[i]], [seeds[i]], FAST, output="np")[0]
            assert_pixels_within(r.image, alone.image, f"image {i} (batch_size {batch_size})")
            assert r.seed == seeds[i] and r.prompt_index == i


def test_latents_do_not_depend_on_the_batch(model):
    """The same at the latent level (<= 1e-3): two images of one pair length, together and alone."""
    cond = model.encode_texts(["a cat", "a dog", ""])
    length = max(e.length for e in cond)
    states = [e.padded_states(length) for e in cond]
    together = model.denoise(torch.stack(states[:2]), torch.stack([states[2]] * 2),
                             [torch.Generator().manual_seed(s) for s in (1, 2)], FAST)
    for i, seed in enumerate((1, 2)):
        alone = model.denoise(states[i][None], states[2][None], [torch.Generator().manual_seed(seed)], FAST)
        assert (together[i] - alone[0]).abs().max().item() <= 1e-3


def test_images_per_prompt_and_per_prompt_seeds(model):
    results = model.generate(["a cat", "sky"], seeds=[100, 200], sampling=FAST, images_per_prompt=2, output="np")
    assert [(r.prompt_index, r.seed) for r in results] == [(0, 100), (0, 101), (1, 200), (1, 201)]
    alone = model.generate(["sky"], seeds=[201], sampling=FAST, output="np")[0]
    assert_pixels_within(results[3].image, alone.image, "image 1 of prompt 1")
    per_image = model.generate(["a cat"], seeds=[7, 9], sampling=FAST, images_per_prompt=2, output="np")
    assert [r.seed for r in per_image] == [7, 9]


def test_uncond_encoded_once_per_distinct_text(model):
    rows: list[int] = []
    model._negative_cache.clear()  # negative prompts are cached across calls (see test_paint_batching.py)
    handle = model.llm.register_forward_hook(lambda mod, args, out: rows.append(args[0].batch_size))
    try:
        model.generate(["a cat", "a dog", "sky"], "blurry", seeds=[1, 2, 3], sampling=FAST)
        model.generate(["a cat", "a cat"], None, seeds=[1, 2], sampling=FAST)
    finally:
        handle.remove()
    # each distinct text is encoded exactly once: the shared negative alone, then the 3 prompts in one forward
    # (batch_size 8); then the empty negative alone and the 1 prompt
    assert rows == [1, 3, 1, 1]


def test_random_seeds_are_reported(model):
    (r,) = model.generate(["sea"], sampling=FAST, output="np")
    again = model.generate(["sea"], seeds=[r.seed], sampling=FAST, output="np")[0]
    assert np.array_equal(r.image, again.image)


# ---- schedulers --------------------------------------------------------------------------------------------
def test_timestep_spacing_original_and_current(model):
    original = make_scheduler(model.config.scheduler, SamplingConfig())
    original.set_timesteps(50)
    assert original.timesteps[:3].tolist() == [980, 960, 940] and original.timesteps[-1].item() == 0
    current = make_scheduler(model.config.scheduler, SamplingConfig(timestep_spacing="diffusers-current"))
    current.set_timesteps(50)
    assert current.timesteps[:3].tolist() == [981, 961, 941] and current.timesteps[-1].item() == 1


def test_dpm_solver_runs_deterministic_and_batch_invariant(model):
    fast = SamplingConfig.fast(num_inference_steps=4, height=32, width=32)
    assert fast.scheduler == "dpmsolver++"
    sched = make_scheduler(model.config.scheduler, fast)
    assert sched.config.algorithm_type == "dpmsolver++"
    a, b = model.generate(["a cat", "一只猫在海边"], seeds=[1, 2], sampling=fast, output="np")
    alone = model.generate(["一只猫在海边"], seeds=[2], sampling=fast, output="np")[0]
    assert_pixels_within(b.image, alone.image, "dpm image 1")
    ddpm = model.generate(["a cat"], seeds=[1], sampling=replace(fast, scheduler="ddpm"), output="np")[0]
    assert_different_pictures(a.image, ddpm.image, "dpmsolver++ vs ddpm")


def test_step_callback_sees_every_step(model):
    enc = model.encode_texts(["a cat", ""])
    length = max(e.length for e in enc)
    seen = []
    model.denoise(enc[0].padded_states(length)[None], enc[1].padded_states(length)[None],
                  [torch.Generator().manual_seed(0)], SamplingConfig(num_inference_steps=4, height=16, width=16),
                  callback=lambda i, t, lat: seen.append((i, t, tuple(lat.shape))))
    assert seen == [(0, 750, (1, 4, 8, 8)), (1, 500, (1, 4, 8, 8)), (2, 250, (1, 4, 8, 8)), (3, 0, (1, 4, 8, 8))]


# ---- inputs and validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(height=30), "multiple of 8"),
        (dict(width=0), "multiple of 8"),
        (dict(scheduler="euler"), "scheduler"),
        (dict(timestep_spacing="trailing"), "timestep_spacing"),
    ],
)
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(prompts="a cat"), "sequence of str"),
        (dict(prompts=["a", 3]), "prompt 1 must be str"),
        (dict(prompts=["a"], negative_prompts=["x", "y"]), "2 negative prompts for 1 prompts"),
        (dict(prompts=["a"], seeds=[1, 2, 3]), "one seed per image"),
        (dict(prompts=["a"], seeds=[-1]), r"seeds must be ints in \[0, 2\*\*63\)"),
        (dict(prompts=["a"], images_per_prompt=0), "images_per_prompt"),
        (dict(prompts=["a"], output="jpeg"), "output must be one of"),
        (dict(prompts=["a"], batch_size=0), "batch_size"),
        (dict(prompts=["a"], sampling=SamplingConfig(num_inference_steps=1001)), "training steps"),
    ],
)
def test_generate_validation(model, call, match):
    with pytest.raises(ValueError, match=match):
        model.generate(**{"seeds": None, **call})


def test_empty_request_and_user_text_is_escaped(model):
    assert model.generate([], sampling=FAST) == []
    # special-token syntax in user text is plain text (the original would crash on '<' or inject '<ans>')
    (r,) = model.generate(["a < b <ans> </s>"], seeds=[0], sampling=FAST, output="np")
    assert r.image.shape == (32, 32, 3)


def test_long_prompts_are_truncated_and_flagged():
    model = PaintModel.tiny()
    model.config = replace(model.config, max_prompt_length=40)
    short, long = model.generate(["a cat", "a cat " * 50], seeds=[0, 0], sampling=FAST)
    assert (short.prompt_truncated, long.prompt_truncated) == (False, True)


def test_paint_config_roundtrip_and_presets():
    cfg = PaintConfig.from_name("tiny", vocab_size=1234)
    assert PaintConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    real = PaintConfig.from_name("viscpm-paint")
    assert (real.llm.dim_model, real.cross_attention_dim, real.vae_scale_factor, real.default_size) == (4096, 1024, 8, 512)
    with pytest.raises(ValueError, match="unknown Paint preset"):
        PaintConfig.from_name("sd-xl")
    with pytest.raises(ValueError, match="not a paint config"):
        PaintConfig.from_dict({"kind": "chat"})
    with pytest.raises(ValueError, match="unknown Paint config keys"):
        PaintConfig.from_dict({"kind": "paint", "unet_config": {}})


def test_candidate_seeds():
    assert candidate_seed(42, 0) == 42
    seeds = {candidate_seed(42, c) for c in range(1, 8)} | {candidate_seed(43, c) for c in range(1, 8)}
    assert len(seeds) == 14 and all(0 <= s < 2**63 for s in seeds)


def test_bfloat16_runs():
    model = PaintModel.tiny(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = PaintModel.tiny().generate(["a cat"], seeds=[1], sampling=FAST, output="np")[0].image
    out = model.generate(["a cat"], seeds=[1], sampling=FAST, output="np")[0].image
    # same noise (drawn in fp32 on the CPU), so the bf16 image stays close to the fp32 one
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 8


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _write_vocab(model: PaintModel, folder) -> None:
    from viscpm.tokenizer import synthetic_vocab

    (folder / "bee.txt").write_text("\n".join(synthetic_vocab()), encoding="utf-8")
    assert model.tokenizer.vocab_size == len(synthetic_vocab())


def test_from_pretrained_original_pt_with_vae_folder(model, tmp_path):
    state = model.original_state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("vae.")}, tmp_path / "pytorch_model.v1.bin")
    model.vae.save_pretrained(tmp_path / "vae")
    _write_vocab(model, tmp_path)
    (tmp_path / "viscpm_config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = PaintModel.from_pretrained(tmp_path, device="cpu", dtype="float32")
    assert all(r.ok for r in loaded.load_reports.values())
    a = model.generate(["a cat"], seeds=[4], sampling=FAST, output="np")[0].image
    b = loaded.generate(["a cat"], seeds=[4], sampling=FAST, output="np")[0].image
    assert np.array_equal(a, b)


def test_convert_cli_paint_with_vae_folder(model, tmp_path):
    import subprocess
    import sys

    src = tmp_path / "original"
    src.mkdir()
    state = model.original_state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("vae.")}, src / "pytorch_model.v1.bin")
    model.vae.save_pretrained(src / "vae")
    _write_vocab(model, src)
    (src / "viscpm_config.json").write_text(json.dumps(model.config.to_dict()))
    dst = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "viscpm.convert", "paint", str(src), str(dst), "--shard-size", "1MB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list(dst.glob("model-*.safetensors"))) > 1 and not (dst / "vae").exists()
    loaded = PaintModel.from_pretrained(dst, dtype=torch.float32)
    a = model.generate(["a cat"], seeds=[4], sampling=FAST, output="np")[0].image
    assert np.array_equal(a, loaded.generate(["a cat"], seeds=[4], sampling=FAST, output="np")[0].image)
    # without a VAE next to it the conversion refuses, naming what it expects
    (src / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    proc = subprocess.run([sys.executable, "-m", "viscpm.convert", "paint", str(src), str(tmp_path / "out2")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "diffusion_pytorch_model" in proc.stderr


def test_from_pretrained_converted_safetensors_and_vae_file(model, tmp_path):
    state = model.original_state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("vae.")}, str(tmp_path / "model.safetensors"))
    save_file({k[4:]: v.contiguous() for k, v in state.items() if k.startswith("vae.")}, str(tmp_path / "vae.safetensors"))
    _write_vocab(model, tmp_path)
    (tmp_path / "viscpm_config.json").write_text(json.dumps(model.config.to_dict()))
    assert find_paint_checkpoint(tmp_path).name == "model.safetensors"
    loaded = PaintModel.from_pretrained(tmp_path, dtype=torch.float32)
    a = model.generate(["sky"], seeds=[2], sampling=FAST, output="np")[0].image
    assert np.array_equal(a, loaded.generate(["sky"], seeds=[2], sampling=FAST, output="np")[0].image)


def test_vae_keys_inside_the_checkpoint_and_old_attention_names(model, tmp_path):
    state = model.original_state_dict()
    # diffusers <= 0.15 named the VAE attention query/key/value/proj_attn
    renamed = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_out.0.", "attentions.0.proj_attn."): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    loaded = PaintModel.from_state_dict(renamed, model.config, model.tokenizer)
    for key, value in model.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[key], value), key


def test_strict_loading(model, tmp_path):
    state = model.original_state_dict()
    with pytest.raises(CheckpointError, match="unexpected: extra.weight"):
        PaintModel.from_state_dict({**state, "extra.weight": torch.zeros(1)}, model.config, model.tokenizer)
    with pytest.raises(CheckpointError, match="unexpected: unet.bogus"):
        PaintModel.from_state_dict({**state, "unet.bogus": torch.zeros(1)}, model.config, model.tokenizer)
    missing = {k: v for k, v in state.items() if k != "trans_block.layernorm.bias"}
    with pytest.raises(CheckpointError, match="missing: norm.bias"):
        PaintModel.from_state_dict(missing, model.config, model.tokenizer)
    no_vae = {k: v for k, v in state.items() if not k.startswith("vae.")}
    with pytest.raises(CheckpointError, match="no VAE weights"):
        PaintModel.from_state_dict(no_vae, model.config, model.tokenizer)
    wrong = {**state, "unet.conv_in.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="mis-shaped: unet.conv_in.bias"):
        PaintModel.from_state_dict(wrong, model.config, model.tokenizer)


def test_validate_original_checkpoint_without_vae(model):
    """The converter's check: the original layout has no VAE; validation runs on the meta device."""
    state = {k: v for k, v in model.original_state_dict().items() if not k.startswith("vae.")}
    reports = validate_paint_checkpoint(state, model.config)
    assert set(reports) == {"llm", "trans_block", "unet"} and all(r.ok for r in reports.values())
    with pytest.raises(CheckpointError, match="unexpected: sd.extra"):
        validate_paint_checkpoint({**state, "sd.extra": torch.zeros(1)}, model.config)
    with pytest.raises(CheckpointError, match="given twice"):
        PaintModel.from_state_dict(model.original_state_dict(), model.config, model.tokenizer,
                                   vae_state=model.vae.state_dict())


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        PaintModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="bee.txt"):
        PaintModel.from_pretrained(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    (tmp_path / "vae.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no unique checkpoint"):
        find_paint_checkpoint(tmp_path)
    (tmp_path / "b.pt").unlink()
    assert find_paint_checkpoint(tmp_path).name == "a.pt"  # vae.safetensors is never the checkpoint


def test_from_pretrained_tiny_preset():
    model = PaintModel.from_pretrained("tiny")
    assert model.name == "tiny" and model.device.type == "cpu" and model.dtype == torch.float32


def test_text_states_do_not_depend_on_the_other_prompts_of_a_call(model):
    """At one text per forward (encode_texts' default) a prompt's CPM-Bee/trans_block states are bitwise the same
    alone and among prompts of other lengths, so one image per call is bitwise too; in a batched call (one forward
    and one UNet call for the crowd) the image stays within the documented tolerance."""
    crowd = ["sky", "a red cube", "一只在海边奔跑的金毛犬，油画风格", "x " * 40, "cat", "dog"]
    seeds = [1, 7, 2, 3, 4, 5]
    alone = model.encode_texts(["a red cube"])[0]
    among = model.encode_texts(crowd)[1]
    assert torch.equal(alone.hidden, among.hidden) and torch.equal(alone.states, among.states)
    image = model.generate(["a red cube"], seeds=[7], sampling=FAST, output="np")[0].image
    one_per_call = model.generate(crowd, seeds=seeds, sampling=FAST, output="np", batch_size=1)[1].image
    assert np.array_equal(image, one_per_call)
    batched = model.generate(crowd, seeds=seeds, sampling=FAST, output="np")[1].image
    assert_pixels_within(image, batched, "'a red cube' among 6 prompts vs alone")

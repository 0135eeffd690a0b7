"""VisCPM-Paint against golden data recorded from the original (VISCPM_REFERENCE_DIR, README section 3).

Every config value, prompt, seed, step count, size and guidance scale comes from the fixture files; only the
tolerances are ours: hidden states <= 1e-4 abs, latents <= 1e-3 abs, uint8 pixels within 1.
`paint_cases_diffusers0150.*` is the original as published (diffusers 0.15.0 timestep spacing): our DEFAULT
sampling must reproduce it. `paint_cases.*` is the original run with today's diffusers: our
timestep_spacing="diffusers-current" must reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reference_data import assert_close
from viscpm.config import CPMBeeConfig
from viscpm.paint import PaintConfig, PaintModel, SamplingConfig, to_uint8

pytestmark = [pytest.mark.parity, pytest.mark.numeric]

HIDDEN_ATOL = 1e-4
LATENT_ATOL = 1e-3
PIXEL_ATOL = 1


class PaintFixture:
    def __init__(self, ref: Path) -> None:
        self.config_json = json.loads((ref / "paint_config.json").read_text(encoding="utf-8"))
        self.cases = json.loads((ref / "paint_cases.json").read_text(encoding="utf-8"))["cases"]
        self.tensors = load_file(str(ref / "paint_cases.safetensors"))
        old = json.loads((ref / "paint_cases_diffusers0150.json").read_text(encoding="utf-8"))
        self.old_cases = {c.get("case_index", i): c for i, c in enumerate(old["cases"])}
        self.old_tensors = load_file(str(ref / "paint_cases_diffusers0150.safetensors"))

    def paint_config(self) -> PaintConfig:
        cj = self.config_json
        llm = CPMBeeConfig.from_dict(cj["llm"]["config_kwargs"])
        config = PaintConfig(llm=llm, unet=cj["unet"]["config"], vae=cj["vae"]["config"],
                             scheduler=cj["scheduler"]["from_config_input"])
        # the trans_block's recorded constructor args: (dim_model, dim_ff (unused), cross_attention_dim)
        dim_in, _, dim_out = cj["trans_block"]["args"]
        assert (dim_in, dim_out) == (llm.dim_model, config.cross_attention_dim)
        assert config.vae_scale_factor == cj["vae"]["vae_scale_factor"]
        return config

    def t(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@pytest.fixture(scope="module")
def fx(reference_dir: Path) -> PaintFixture:
    if not (reference_dir / "paint_cases.json").is_file():
        pytest.skip(f"no paint fixtures in {reference_dir}")
    return PaintFixture(reference_dir)


@pytest.fixture(scope="module")
def paint_model(fx: PaintFixture, reference_dir: Path, vocab_file: Path, tmp_path_factory) -> PaintModel:
    """Through the real folder path: bee.txt, the checkpoint in the original key layout as model.safetensors,
    vae.safetensors and a viscpm_config.json (links to the fixture files in a temporary folder)."""
    folder = tmp_path_factory.mktemp("paint_model")
    (folder / "bee.txt").symlink_to(vocab_file)
    (folder / "model.safetensors").symlink_to(reference_dir / "paint_model.safetensors")
    (folder / "vae.safetensors").symlink_to(reference_dir / "vae.safetensors")
    (folder / "viscpm_config.json").write_text(json.dumps(fx.paint_config().to_dict()))
    model = PaintModel.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert all(report.ok for report in model.load_reports.values())
    return model


def _sampling(case: dict, **overrides) -> SamplingConfig:
    kwargs = case.get("sd_generate_kwargs", {})
    return SamplingConfig(num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
                          height=kwargs.get("height", case["image_size"]), width=kwargs.get("width", case["image_size"]),
                          **overrides)


def _generator(case: dict) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(case["generator_seed"])


def _cases(fx: PaintFixture):
    for k, case in enumerate(fx.cases):
        yield k, case


# ---- text side ----------------------------------------------------------------------------------------------
def test_structured_inputs(fx, paint_model):
    for k, case in _cases(fx):
        # the original feeds the raw prompt into the tokenizer: trusted=True reproduces that
        built = paint_model.build_inputs(case["prompt"], case["negative_prompt"], trusted=True)
        for branch, ours in zip(("cond", "uncond"), built):
            what = f"case {k} ({case['name']}) {branch}"
            ref = lambda name: fx.t(f"case{k}.inputs.{branch}.{name}")  # noqa: E731
            assert ours.seq_len == case["padded_length"], what
            for name in ("input_ids", "input_id_subs", "segment_ids", "num_segments", "sample_ids",
                         "segment_rel_offset", "length"):
                assert torch.equal(getattr(ours, name).long(), ref(name).long()), f"{what}: {name}"
            assert torch.equal(ours.context.bool(), ref("context").bool()), f"{what}: context"
            assert not ref("span").any() and ref("image_bound").numel() == 0
            # segment_rel: the n_seg x n_seg table, zero-padded to the padded length when that is longer
            rel, rel_ref = ours.segment_rel[0].long(), ref("segment_rel")[0].long()
            assert torch.equal(rel_ref[: rel.numel()], rel) and not rel_ref[rel.numel():].any(), f"{what}: segment_rel"
            # ext table (logits only, unused by Paint): the original appends a (0, 1) int64 placeholder when
            # empty and lists every occurrence; we list each (id, sub > 0) pair once
            ids, subs = ref("ext_table_ids"), ref("ext_table_sub")
            expected = set() if ids.dtype == torch.int64 else set(zip(ids.tolist(), subs.tolist()))
            assert set(zip(ours.ext_table_ids.tolist(), ours.ext_table_sub.tolist())) == expected, f"{what}: ext table"


def test_llm_hidden_states_and_trans_block(fx, paint_model):
    for k, case in _cases(fx):
        cond, uncond, length = paint_model.encode_pair(case["prompt"], case["negative_prompt"], trusted=True)
        assert (cond.length, uncond.length, length) == (case["cond_length"], case["uncond_length"], case["padded_length"])
        what = f"case {k} ({case['name']})"
        # every position, padding included, as the original feeds them to the UNet
        assert_close(cond.padded_hidden(length)[None], fx.t(f"case{k}.llm_hidden_cond"), f"{what} llm cond", HIDDEN_ATOL)
        assert_close(uncond.padded_hidden(length)[None], fx.t(f"case{k}.llm_hidden_uncond"), f"{what} llm uncond", HIDDEN_ATOL)
        assert_close(cond.padded_states(length)[None], fx.t(f"case{k}.trans_block_cond"), f"{what} trans_block cond", HIDDEN_ATOL)
        assert_close(uncond.padded_states(length)[None], fx.t(f"case{k}.trans_block_uncond"), f"{what} trans_block uncond",
                     HIDDEN_ATOL)


def test_initial_latents(fx, paint_model):
    for k, case in _cases(fx):
        s = _sampling(case)
        latents = paint_model.initial_latents([_generator(case)], s.height, s.width)
        assert_close(latents, fx.t(f"case{k}.initial_latents"), f"case {k} initial latents", LATENT_ATOL)


# ---- denoising --------------------------------------------------------------------------------------------------
def _run(paint_model: PaintModel, case: dict, sampling: SamplingConfig):
    cond, uncond, length = paint_model.encode_pair(case["prompt"], case["negative_prompt"], trusted=True)
    steps: list[tuple[int, torch.Tensor]] = []
    unet_out: list[torch.Tensor] = []
    handle = paint_model.unet.register_forward_hook(lambda mod, args, out: unet_out.append(out[0].detach().clone()))
    try:
        latents = paint_model.denoise(cond.padded_states(length)[None], uncond.padded_states(length)[None],
                                      [_generator(case)], sampling,
                                      callback=lambda i, t, lat: steps.append((t, lat.clone())))
    finally:
        handle.remove()
    image = paint_model.decode_latents(latents)
    return steps, torch.stack(unet_out), image


def _check_images(paint_model, case, k, sampling, image, image_float, image_uint8, what):
    assert_close(image, image_float, f"{what}: image float", LATENT_ATOL)
    diff = np.abs(to_uint8(image).astype(int) - image_uint8.numpy().astype(int)).max()
    assert diff <= PIXEL_ATOL, f"{what}: uint8 pixels differ by {diff}"
    # the public batched entry point gives the same image
    (result,) = paint_model.generate([case["prompt"]], [case["negative_prompt"]], [case["generator_seed"]], sampling,
                                     output="np", trusted=True)
    diff = np.abs(result.image.astype(int) - image_uint8[0].numpy().astype(int)).max()
    assert diff <= PIXEL_ATOL, f"{what}: generate() pixels differ by {diff}"


def test_default_sampling_reproduces_the_published_original(fx, paint_model):
    """Default settings = the original as released (diffusers 0.15.0: DDPM timesteps without steps_offset)."""
    assert SamplingConfig().scheduler == "ddpm" and SamplingConfig().num_inference_steps == 50
    for k, case in _cases(fx):
        old = fx.old_cases[k]
        assert old["prompt"] == case["prompt"] and old["generator_seed"] == case["generator_seed"]
        what = f"case {k} ({case['name']}), diffusers 0.15.0 spacing"
        sampling = _sampling(old)
        steps, _, image = _run(paint_model, old, sampling)
        assert [t for t, _ in steps] == old["timesteps"], what
        expected = fx.old_tensors[f"case{k}.latents_after_step"]
        for i, (_, lat) in enumerate(steps):
            assert_close(lat, expected[i], f"{what}: latents after step {i}", LATENT_ATOL)
        _check_images(paint_model, old, k, sampling, image, fx.old_tensors[f"case{k}.image_float"],
                      fx.old_tensors[f"case{k}.image_uint8"], what)


def test_current_diffusers_spacing_option(fx, paint_model):
    for k, case in _cases(fx):
        what = f"case {k} ({case['name']}), current diffusers spacing"
        sampling = _sampling(case, timestep_spacing="diffusers-current")
        steps, unet_out, image = _run(paint_model, case, sampling)
        assert [t for t, _ in steps] == case["timesteps"], what
        expected_unet = fx.t(f"case{k}.unet_out")
        expected = fx.t(f"case{k}.latents_after_step")
        for i, (_, lat) in enumerate(steps):
            assert_close(unet_out[i], expected_unet[i], f"{what}: UNet output at step {i}", LATENT_ATOL)
            assert_close(lat, expected[i], f"{what}: latents after step {i}", LATENT_ATOL)
        _check_images(paint_model, case, k, sampling, image, fx.t(f"case{k}.image_float"),
                      fx.t(f"case{k}.image_uint8"), what)

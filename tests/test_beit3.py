"""Unit tests for the BEiT-3 vision encoder (tiny random config), its key map, and image preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.beit3 import (
    BEIT3_PRESETS,
    DROPPED_ORIGINAL_KEYS,
    BEiT3Config,
    VisionQueryConfig,
    VisionQueryEncoder,
    load_vision_encoder,
    load_vision_state_dict,
    original_key_map,
    to_original_state_dict,
)
from viscpm.checkpoint import CheckpointError
from viscpm.image import preprocess_images, to_rgb

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

TINY = VisionQueryConfig(
    beit3=BEiT3Config(
        img_size=32, patch_size=16, embed_dim=16, num_heads=2, ffn_dim=24, num_layers=2,
        max_source_positions=12, text_vocab_size=10,
    ),
    query_num=5,
    llm_dim=8,
)


def _random_model(seed: int = 0) -> VisionQueryEncoder:
    torch.manual_seed(seed)
    model = VisionQueryEncoder(TINY).eval()
    with torch.no_grad():  # perturb everything, so a swapped A/B or LayerNorm would show up
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _original_checkpoint(model: VisionQueryEncoder) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in to_original_state_dict(model).items()}
    e = TINY.vision_dim
    sd["vpm.beit3.text_embed.weight"] = torch.zeros(TINY.beit3.text_vocab_size, e)
    sd["vpm.beit3.vision_embed.mask_token"] = torch.zeros(1, 1, e)
    sd["llm.input_embedding.weight"] = torch.zeros(3, TINY.llm_dim)
    return sd


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, TINY.beit3.img_size, TINY.beit3.img_size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------- config


def test_presets_and_config_from_kwargs() -> None:
    large = BEIT3_PRESETS["beit3-large"]
    assert (large.embed_dim, large.num_heads, large.num_layers, large.ffn_dim) == (1024, 16, 24, 4096)
    assert (large.img_size, large.patch_size, large.text_vocab_size, large.num_image_tokens) == (224, 16, 64010, 197)
    assert BEiT3Config.from_preset("beit3-large") is large
    with pytest.raises(ValueError, match="unknown"):
        BEiT3Config.from_preset("beit3-huge")
    chat_json = {
        "beit3": {"kwargs": {"img_size": 64, "patch_size": 16, "multiway": True, "encoder_embed_dim": 24,
                             "encoder_attention_heads": 3, "encoder_ffn_embed_dim": 40, "encoder_layers": 1,
                             "vocab_size": 7},
                  "resolved_encoder_config": {"layernorm_eps": 1e-6, "max_source_positions": 99, "subln": True}},
        "query_num": 4, "vision_dim": 24, "llm": {"config_kwargs": {"dim_model": 12}},
    }
    cfg = VisionQueryConfig.from_chat_config(chat_json)
    assert cfg.beit3 == BEiT3Config(img_size=64, patch_size=16, embed_dim=24, num_heads=3, ffn_dim=40,
                                    num_layers=1, layernorm_eps=1e-6, max_source_positions=99, text_vocab_size=7)
    assert (cfg.query_num, cfg.llm_dim, cfg.vision_dim) == (4, 12, 24)
    with pytest.raises(NotImplementedError, match="deepnorm"):
        BEiT3Config.from_encoder_kwargs({"deepnorm": True})
    with pytest.raises(ValueError, match="vision_dim"):
        VisionQueryConfig.from_chat_config({**chat_json, "vision_dim": 25})


# ------------------------------------------------------------------------------------------------------ model


def test_forward_shapes_and_batch_consistency() -> None:
    model = _random_model()
    pixels = _pixels(3)
    with torch.no_grad():
        hidden = model(pixels)
        assert hidden.shape == (3, TINY.query_num, TINY.llm_dim)
        assert model.query_features(pixels).shape == (3, TINY.query_num, TINY.vision_dim)
        assert model.beit3(pixels).shape == (3, TINY.beit3.num_image_tokens, TINY.vision_dim)
        for i in range(3):
            torch.testing.assert_close(model(pixels[i : i + 1])[0], hidden[i], atol=1e-6, rtol=0)


def test_key_map_is_a_bijection_onto_the_module() -> None:
    key_map = original_key_map(TINY)
    ours = VisionQueryEncoder(TINY, device="meta").state_dict()
    assert sorted(key_map.values()) == sorted(ours)
    assert len(set(key_map.values())) == len(key_map)
    assert not set(key_map) & set(DROPPED_ORIGINAL_KEYS)


@pytest.mark.parametrize("meta", [True, False])
def test_key_map_round_trip(meta: bool) -> None:
    source = _random_model(0)
    checkpoint = _original_checkpoint(source)
    if meta:
        target, report = load_vision_encoder(TINY, checkpoint)
    else:
        target = _random_model(1)
        report = load_vision_state_dict(target, checkpoint)
    assert report.ignored == ["llm.input_embedding.weight"]
    assert report.dropped == ["vpm.beit3.text_embed.weight", "vpm.beit3.vision_embed.mask_token"]
    assert report.absent_dropped == ["vpm.mim_head.bias", "vpm.mim_head.weight"]
    assert len(report.loaded) == len(original_key_map(TINY))
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    pixels = _pixels()
    with torch.no_grad():
        assert torch.equal(target(pixels), source(pixels))


def test_meta_load_converts_dtype() -> None:
    model, _ = load_vision_encoder(TINY, _original_checkpoint(_random_model()), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(_pixels())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "mutate, kind, key",
    [
        (lambda sd: sd.pop("vpm.beit3.encoder.layers.1.ffn.B.fc2.bias"), "missing",
         "vpm.beit3.encoder.layers.1.ffn.B.fc2.bias"),
        (lambda sd: sd.pop("query"), "missing", "query"),
        (lambda sd: sd.__setitem__("mapping.0.weight", torch.zeros(3, 3)), "shape", "mapping.0.weight"),
        (lambda sd: sd.__setitem__("vpm.beit3.encoder.layers.0.self_attn.q_proj.A.weight", torch.zeros(16, 15)),
         "shape", "vpm.beit3.encoder.layers.0.self_attn.q_proj.A.weight"),
        (lambda sd: sd.__setitem__("vpm.beit3.encoder.layers.2.final_layer_norm.A.weight", torch.zeros(16)),
         "unexpected", "vpm.beit3.encoder.layers.2.final_layer_norm.A.weight"),
        (lambda sd: sd.__setitem__("mapping.4.bias", torch.zeros(8)), "unexpected", "mapping.4.bias"),
    ],
)
def test_bad_checkpoint_names_the_key(mutate, kind: str, key: str) -> None:
    checkpoint = _original_checkpoint(_random_model())
    mutate(checkpoint)
    with pytest.raises(CheckpointError, match=kind) as excinfo:
        load_vision_encoder(TINY, checkpoint)
    assert key in str(excinfo.value)
    error = excinfo.value
    listed = {"missing": error.missing, "unexpected": error.unexpected, "shape": error.mismatched}[kind]
    assert any(entry.split(" ")[0] == key for entry in listed), listed


# --------------------------------------------------------------------------------------------- preprocessing


def _rgb_reference(image: Image.Image, size: int = 224) -> torch.Tensor:
    array = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


def _modes() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (7, 9, 4), dtype=np.uint8), "RGBA")
    p_transparent = rgb.convert("P")
    p_transparent.info["transparency"] = 0
    return [
        rgb.convert("L"), rgba.convert("LA"), rgb.convert("P"), p_transparent, rgba, rgb.convert("CMYK"),
        Image.fromarray(rng.integers(0, 65536, (7, 9), dtype=np.uint16)), rgb.convert("1"),
        rgba.convert("RGBa"), rgba.convert("LA").convert("La"), rgba.convert("PA"), rgb.convert("YCbCr"),
        Image.fromarray(rng.integers(0, 70000, (7, 9), dtype=np.int32)),
        Image.fromarray(rng.uniform(-5, 300, (7, 9)).astype(np.float32)),
        Image.new("RGB", (1, 1), (10, 20, 30)), Image.new("L", (5000, 3), 200), Image.new("RGB", (3, 5000)),
    ]


def test_preprocess_any_mode_and_size() -> None:
    images = _modes()
    pixels = preprocess_images(images)
    assert pixels.shape == (len(images), 3, 224, 224) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert preprocess_images([]).shape == (0, 3, 224, 224)
    assert preprocess_images([images[0]], size=32).shape == (1, 3, 32, 32)


def test_preprocess_rgb_is_plain_pil_bicubic() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    image.info["transparency"] = (0, 0, 0)  # ignored for RGB, as convert('RGB') ignores it
    assert torch.equal(preprocess_images([image])[0], _rgb_reference(image))
    square = image.resize((224, 224))
    assert torch.equal(preprocess_images([square])[0], _rgb_reference(square))


def test_preprocess_alpha_and_wide_modes() -> None:
    opaque = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    assert torch.equal(preprocess_images([opaque]), preprocess_images([opaque.convert("RGB")]))
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (preprocess_images([transparent]) == 1).all()  # white background by default
    assert (preprocess_images([transparent], background=(0, 0, 0)) == -1).all()
    # 16-bit data is rescaled, not clipped at 255 as PIL's convert('RGB') would.
    sixteen = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (128, 128, 128)
    eight_in_i = Image.fromarray(np.full((4, 4), 77, dtype=np.int32))
    assert to_rgb(eight_in_i).getpixel((0, 0)) == (77, 77, 77)

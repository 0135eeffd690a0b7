"""Parity of preprocessing, BEiT-3 + queries + mapping against golden data from the original VisCPM-Chat.

`reference_dir` comes from tests/conftest.py. Every dimension comes from chat_config.json, so another fixture set
with other dims runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from viscpm.beit3 import (
    DROPPED_ORIGINAL_KEYS,
    IGNORED_ORIGINAL_PREFIXES,
    VisionQueryConfig,
    load_vision_encoder,
)
from viscpm.image import preprocess_images

pytestmark = [pytest.mark.parity, pytest.mark.numeric]

TOL = 1e-4


@pytest.fixture(scope="module")
def chat(reference_dir: Path) -> dict:
    from safetensors.torch import load_file

    needed = ["chat_config.json", "chat_cases.json", "chat_cases.safetensors", "chat_model.safetensors"]
    absent = [name for name in needed if not (reference_dir / name).is_file()]
    if absent:
        pytest.skip(f"chat reference files missing in {reference_dir}: {absent}")
    config_json = json.loads((reference_dir / "chat_config.json").read_text(encoding="utf-8"))
    state_dict = load_file(reference_dir / "chat_model.safetensors")
    model, report = load_vision_encoder(VisionQueryConfig.from_chat_config(config_json), state_dict)
    return {
        "config_json": config_json,
        "cases_json": json.loads((reference_dir / "chat_cases.json").read_text(encoding="utf-8")),
        "tensors": load_file(reference_dir / "chat_cases.safetensors"),
        "state_dict": state_dict,
        "model": model,
        "report": report,
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def test_pixel_values(chat: dict, reference_dir: Path) -> None:
    images = chat["cases_json"]["images"]
    assert images
    for entry in images:
        with Image.open(reference_dir / entry["file"]) as image:
            ours = preprocess_images([image])
        ref = chat["tensors"][entry["pixel_values"]]
        diff = _max_diff(ours, ref)
        assert diff <= 1e-6, f"{entry['file']}: pixel values max abs diff {diff:.3g}"


def test_key_map_report(chat: dict) -> None:
    report, state_dict = chat["report"], chat["state_dict"]
    keys = set(state_dict)
    llm_keys = {k for k in keys if k.startswith(IGNORED_ORIGINAL_PREFIXES)}
    assert set(report.ignored) == llm_keys
    assert set(report.dropped) == keys & set(DROPPED_ORIGINAL_KEYS)
    assert set(report.loaded) == keys - llm_keys - set(DROPPED_ORIGINAL_KEYS)
    # The fixture omits exactly the unused MIM head (README, "Omitted from chat_model.safetensors").
    omitted = set(chat["config_json"].get("omitted_from_file", {}))
    assert set(report.absent_dropped) == omitted
    # Weights were assigned (meta build), not copied: one copy only.
    for name, param in chat["model"].named_parameters():
        assert not param.is_meta, name
    assert chat["model"].query.data_ptr() == state_dict["query"].data_ptr()


def test_cases_query_out_and_vision_hidden_states(chat: dict) -> None:
    cases, tensors, model = chat["cases_json"]["cases"], chat["tensors"], chat["model"]
    assert cases
    diffs = []
    with torch.no_grad():
        for k, case in enumerate(cases):
            pixels = tensors[case["pixel_values"]]
            query_out = model.query_features(pixels)
            hidden = model(pixels)
            d_query = _max_diff(query_out, tensors[f"case{k}.beit3_query_out"])
            d_hidden = _max_diff(hidden, tensors[f"case{k}.vision_hidden_states"])
            diffs.append((case.get("name", k), d_query, d_hidden))
    report = "; ".join(f"{name}: beit3_query_out {q:.3g}, vision_hidden_states {h:.3g}" for name, q, h in diffs)
    assert all(q <= TOL and h <= TOL for _, q, h in diffs), report


def test_batch_matches_single(chat: dict) -> None:
    cases, tensors, model = chat["cases_json"]["cases"], chat["tensors"], chat["model"]
    image_keys = [entry["pixel_values"] for entry in chat["cases_json"]["images"]]
    with torch.no_grad():
        batch = model(torch.cat([tensors[key] for key in image_keys]))
        singles = {key: model(tensors[key])[0] for key in image_keys}
    for i, key in enumerate(image_keys):
        diff = _max_diff(batch[i], singles[key])
        assert diff <= 1e-5, f"{key}: batched vs alone max abs diff {diff:.3g}"
    for k, case in enumerate(cases):
        diff = _max_diff(batch[image_keys.index(case["pixel_values"])], tensors[f"case{k}.vision_hidden_states"][0])
        assert diff <= TOL, f"case{k} batched vs reference max abs diff {diff:.3g}"

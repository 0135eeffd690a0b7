"""VisCPM-Chat end to end against the original: from the fixture's image files, questions and checkpoint to
the recorded pixel values, vision states, spliced prompt embedding, prompt logits and beam-search answers.
Everything - configs, cases, expected values - is read from the fixture folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reference_data import assert_close, chat_inputs, literal
from viscpm.beit3 import VisionQueryConfig
from viscpm.chat import ChatConfig, ChatModel
from viscpm.checkpoint import read_state_dict
from viscpm.config import CPMBeeConfig
from viscpm.generation import GenerationConfig
from viscpm.inputs import build_chat_sample, collate
from viscpm.tokenizer import CPMBeeTokenizer, unescape_text

pytestmark = [pytest.mark.parity, pytest.mark.numeric]


@pytest.fixture(scope="module")
def chat_model(reference_dir: Path, bee_tokenizer: CPMBeeTokenizer) -> ChatModel:
    cfg = json.loads((reference_dir / "chat_config.json").read_text(encoding="utf-8"))
    config = ChatConfig(llm=CPMBeeConfig.from_dict(cfg["llm"]["config_kwargs"]), vision=VisionQueryConfig.from_chat_config(cfg))
    return ChatModel.from_state_dict(read_state_dict(reference_dir / "chat_model.safetensors"), config, bee_tokenizer)


def image(reference_dir: Path, case: dict) -> Image.Image:
    return Image.open(reference_dir / case["image_file"])


def generation_of(run: dict) -> GenerationConfig:
    kw = literal(run["kwargs"])
    return GenerationConfig.original(kw["max_length"], beam_size=kw["beam_size"], repetition_penalty=kw["repetition_penalty"],
                                     length_penalty=kw["length_penalty"], temperature=kw["temperature"])


def test_pixel_values(chat_reference, reference_dir: Path) -> None:
    from viscpm.image import preprocess_images

    for case in chat_reference.cases:
        pixels = preprocess_images([image(reference_dir, case)])
        expected = chat_reference.t(case["pixel_values"])
        assert_close(pixels, expected, f"{case['name']} pixel values", atol=1e-6)


def test_vision_states_and_spliced_embedding(chat_model: ChatModel, chat_reference, reference_dir: Path) -> None:
    for k, case in enumerate(chat_reference.cases):
        states = chat_model.encode_images([image(reference_dir, case)])
        assert_close(states, chat_reference.t(f"case{k}.vision_hidden_states"), f"{case['name']} vision states")
        sample = build_chat_sample(chat_model.tokenizer, case["question"], case["context"],
                                   query_num=chat_model.config.vision.query_num, trusted=True)
        inputs, metas = collate([sample])
        recorded = chat_inputs(chat_reference, k)
        assert torch.equal(inputs.input_ids, recorded.input_ids) and torch.equal(inputs.input_id_subs, recorded.input_id_subs)
        hidden = chat_model._splice_vision(inputs, [m.image_bound for m in metas], states)
        assert_close(hidden, chat_reference.t(f"case{k}.vllm_embedding"), f"{case['name']} spliced prompt embedding")
        logits, prompt_hidden = chat_model.llm(inputs, hidden_states=hidden)
        assert_close(prompt_hidden, chat_reference.t(f"case{k}.prompt_hidden"), f"{case['name']} prompt hidden states")
        assert_close(logits[:, -1], chat_reference.t(f"case{k}.prompt_logits_last"), f"{case['name']} prompt logits")


@pytest.mark.parametrize("run_name", ["beam", "greedy"])
def test_answers_from_images(chat_model: ChatModel, chat_reference, reference_dir: Path, run_name: str) -> None:
    """Image file + question in, the original's answer out (ids and text), one case at a time."""
    for case in chat_reference.cases:
        run = literal(case[run_name])
        result = chat_model.generate([image(reference_dir, case)], [case["question"]], [case["context"]],
                                     generation=generation_of(run), trusted=True)[0]
        expected = [int(t) for t in literal(run["result_token_ids"]) if int(t) != chat_model.tokenizer.eos_id]
        assert result.token_ids == expected, f"{case['name']} {run_name}: token ids"
        assert result.text == unescape_text(run["answer_text"]), f"{case['name']} {run_name}: text"


def test_batch_of_all_cases_equals_alone(chat_model: ChatModel, chat_reference, reference_dir: Path) -> None:
    cases = chat_reference.cases
    results = chat_model.generate([image(reference_dir, c) for c in cases], [c["question"] for c in cases],
                                  [c["context"] for c in cases], generation=generation_of(literal(cases[0]["beam"])), trusted=True)
    for case, result in zip(cases, results):
        assert result.text == unescape_text(literal(case["beam"])["answer_text"]), f"{case['name']}: batched answer"

"""Decoding against the original VisCPM beam search: from the recorded prompt inputs and vision-spliced
embeddings, our beam search (beam 3) and its beam_size=1 run must pick the recorded token ids exactly, and
decode them to the recorded text. Everything is read from the fixture folder."""

from __future__ import annotations

import pytest

from reference_data import Fixture, batched_chat_inputs, chat_inputs, literal
from viscpm.generation import GenerationConfig, RowSpec, SpecialIds, generate
from viscpm.tokenizer import CPMBeeTokenizer

pytestmark = [pytest.mark.parity, pytest.mark.numeric]


@pytest.fixture(scope="module")
def tokenizer(bee_tokenizer: CPMBeeTokenizer) -> CPMBeeTokenizer:
    return bee_tokenizer


def special_ids(tok: CPMBeeTokenizer) -> SpecialIds:
    return SpecialIds(bos=tok.bos_id, eos=tok.eos_id, unk=tok.unk_id, vocab_size=tok.vocab_size)


def row_spec(chat: Fixture, k: int) -> RowSpec:
    case = chat.cases[k]
    ext_table = {int(key): value for key, value in literal(case["ext_table"]).items()}
    return RowSpec(answer_segment=literal(case["predict_segments"])[0][0], ext_columns=frozenset(ext_table))


def config_of(run: dict) -> GenerationConfig:
    kw = literal(run["kwargs"])
    return GenerationConfig.original(
        kw["max_length"], beam_size=kw["beam_size"], repetition_penalty=kw["repetition_penalty"],
        length_penalty=kw["length_penalty"], temperature=kw["temperature"],
    )


@pytest.mark.parametrize("run_name", ["beam", "greedy"])
def test_beam_search_reproduces_the_reference(chat_reference: Fixture, tokenizer: CPMBeeTokenizer, run_name: str) -> None:
    chat = chat_reference
    for k, case in enumerate(chat.cases):
        run = literal(case[run_name])
        out = generate(chat.model, chat_inputs(chat, k), [row_spec(chat, k)], config_of(run), special_ids(tokenizer),
                       hidden_states=chat.t(f"case{k}.vllm_embedding"))[0]
        expected = [int(t) for t in literal(run["result_token_ids"])]
        if expected and expected[-1] == tokenizer.eos_id:
            expected = expected[:-1]
        assert out.token_ids == expected, f"{case['name']} {run_name}: token ids differ"
        ext_table = {int(key): value for key, value in literal(case["ext_table"]).items()}
        assert tokenizer.decode(out.token_ids, ext_table) == run["answer_text"], f"{case['name']} {run_name}: text"


def test_batched_beam_search_equals_alone(chat_reference: Fixture, tokenizer: CPMBeeTokenizer) -> None:
    """All cases in one batch (different lengths and ext tables) give each case its recorded answer."""
    chat = chat_reference
    cases = [chat_inputs(chat, k) for k in range(len(chat.cases))]
    batch, hidden, offsets = batched_chat_inputs(chat)
    vocab = tokenizer.vocab_size
    rows = []
    for k in range(len(cases)):
        spec = row_spec(chat, k)
        # this row's own ext columns moved to where the batch put them
        shifted = {col if col < vocab else col + offsets[k] for col in spec.ext_columns}
        rows.append(RowSpec(spec.answer_segment, frozenset(shifted)))
    outs = generate(chat.model, batch, rows, config_of(literal(chat.cases[0]["beam"])), special_ids(tokenizer), hidden_states=hidden)
    for k, out in enumerate(outs):
        expected = [int(t) for t in literal(literal(chat.cases[k]["beam"])["result_token_ids"])]
        shifted = [t if t < vocab else t + offsets[k] for t in expected if t != tokenizer.eos_id]
        assert out.token_ids == shifted, f"{chat.cases[k]['name']}: batched beam ids differ"

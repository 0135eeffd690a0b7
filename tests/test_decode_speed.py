"""The GPU-shaped Chat decoding, checked on the CPU: each prompt is prefilled once whatever the beam size, the
shared prompt cache is smaller, the decode step does less, and a compiled decode step answers exactly as eager with
a number of graphs that does not grow with the number of steps and no graph break."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from viscpm.config import CPMBeeConfig
from viscpm.cpmbee import CPMBee
from viscpm.generation import GenerationConfig, RowSpec, SpecialIds, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chat_decode_costs as costs  # noqa: E402

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

SPECIAL = SpecialIds(bos=6, eos=7, unk=1, vocab_size=200)


def reset_dynamo() -> None:
    """torch._dynamo.reset() iterates over a global registry that threads left by earlier tests (e.g. a stage's
    encoder pool finishing) can still touch; a retry is enough."""
    for attempt in range(5):
        try:
            torch._dynamo.reset()
            return
        except RuntimeError:
            if attempt == 4:
                raise



def tiny_lm(seed: int = 2) -> CPMBee:
    config = CPMBeeConfig(vocab_size=200, dim_model=32, num_heads=4, dim_head=8, dim_ff=64, num_layers=2, dtype="float32")
    return CPMBee(config).init_random_(seed).eval()


def test_beam_3_over_8_prompts_prefills_8_rows() -> None:
    assert costs.prefill_rows(prompts=8, beams=3) == 8


def test_shared_prompt_cache_is_smaller_at_the_10b_config() -> None:
    before, after = costs.kv_bytes(prompts=64, beams=3, prompt_len=250, new_tokens=50)
    assert after < 0.5 * before  # 42.2 GiB -> 19.9 GiB


def test_static_decode_step_does_less_than_the_general_one() -> None:
    general, static = costs.decode_ops(layers=4, prompt_len=40)
    assert static < general


def run(lm: CPMBee, strategy: str, new_tokens: int) -> list[list[int]]:
    inputs = costs.synthetic_prompts([5, 11, 8], 200, seed=3)
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=new_tokens, repetition_penalty=1.0)
    return [g.token_ids for g in generate(lm, inputs, [RowSpec(1, frozenset())] * 3, cfg, SPECIAL)]


def test_compiled_decode_equals_eager_with_few_graphs_and_no_break() -> None:
    """aot_eager traces exactly what inductor compiles (fullgraph: any graph break raises); inductor itself is
    checked on the GPU test below and by benchmarks/gpu_check.sh (on the CPU it takes minutes here)."""
    eager_lm = tiny_lm()
    expected = {(s, n): run(eager_lm, s, n) for s in ("greedy", "beam") for n in (9, 16)}
    lm = tiny_lm()
    reset_dynamo()
    counters.clear()
    lm.compile_decode(backend="aot_eager", mode=None)
    for strategy in ("greedy", "beam"):
        assert run(lm, strategy, 9) == expected[(strategy, 9)]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2  # one per shape: greedy (1 row per prompt) and beam (3)
    for strategy in ("greedy", "beam"):  # more steps (same 16 answer slots): no new graph
        assert run(lm, strategy, 16) == expected[(strategy, 16)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    reset_dynamo()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager() -> None:
    eager_lm = tiny_lm().cuda()
    expected = {s: run(eager_lm, s, 8) for s in ("greedy", "beam")}
    lm = tiny_lm().cuda()
    lm.compile_decode()
    assert {s: run(lm, s, 8) for s in ("greedy", "beam")} == expected


def test_chat_from_pretrained_compile_flag() -> None:
    from viscpm import ChatModel

    assert ChatModel.from_pretrained("tiny", compile=True).llm.compiled
    assert not ChatModel.from_pretrained("tiny").llm.compiled


def test_kept_cache_is_rebuilt_when_only_its_layout_changes() -> None:
    """Compiled decoding keeps its buffers between calls; greedy with 24 answer slots and beam 3 with 8 have the
    same buffer shape but not the same layout."""
    expected = {s: run(tiny_lm(), s, n) for s, n in (("greedy", 24), ("beam", 8))}
    lm = tiny_lm()
    reset_dynamo()
    lm.compile_decode(backend="aot_eager", mode=None)
    assert {s: run(lm, s, n) for s, n in (("greedy", 24), ("beam", 8))} == expected
    reset_dynamo()

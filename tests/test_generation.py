"""Decoding strategies on scripted logits (exact control over eos and scores) and on a tiny random CPM-Bee
(batching, seeds). The scripted model stands in for CPM-Bee only; generate() itself runs unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from viscpm.config import CPMBeeConfig
from viscpm.cpmbee import CPMBee
from viscpm.generation import GenerationConfig, RowSpec, SpecialIds, _top_p_filter, generate
from viscpm.inputs import BeeInputs

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

VOCAB = 12
SPECIAL = SpecialIds(bos=6, eos=7, unk=1, vocab_size=VOCAB)


def prompt_inputs(lengths: list[int], ext: int = 0) -> BeeInputs:
    b, n = len(lengths), max(lengths)
    zeros = torch.zeros(b, n, dtype=torch.int32)
    return BeeInputs(
        input_ids=torch.full((b, n), 3, dtype=torch.int32), input_id_subs=zeros, position=zeros.clone(),
        context=torch.ones(b, n, dtype=torch.bool), segment_ids=zeros.clone(), sample_ids=zeros.clone(),
        num_segments=torch.full((b, n), 2, dtype=torch.int32), segment_rel_offset=zeros.clone(),
        segment_rel=torch.zeros(b, 4, dtype=torch.int32), length=torch.tensor(lengths, dtype=torch.int32),
        ext_table_ids=torch.ones(ext, dtype=torch.int32), ext_table_sub=torch.arange(1, ext + 1, dtype=torch.int32),
    )


class ScriptedLM:
    """Has CPM-Bee's decoding interface; next-token logits are a function of the last fed token only."""

    def __init__(self, table: dict[int, list[float]], columns: int = VOCAB) -> None:
        self.embedding = torch.zeros(1)
        self.columns = columns
        self.table = table
        self.fed: list[list[int]] = []

    def start_decoding(self, inputs, answer_segments, group, max_new_tokens, hidden_states=None):
        self.fed = []
        return torch.zeros(inputs.batch_size, self.columns)

    def reorder_rows(self, source: torch.Tensor, written: int) -> None: ...

    def end_decoding(self) -> None: ...

    def decode_next(self, token_ids, token_subs, step):
        self.fed.append(token_ids.tolist())
        default = [0.0] * self.columns
        rows = [self.table.get(int(t), default) for t in token_ids]
        return torch.tensor(rows, dtype=torch.float32)


def logits_favouring(*pairs: tuple[int, float]) -> list[float]:
    row = [-5.0] * VOCAB
    for col, value in pairs:
        row[col] = value
    return row


ROW = RowSpec(answer_segment=1, ext_columns=frozenset())


def test_greedy_stops_at_eos_and_strips_it() -> None:
    # bos -> 4 -> 5 -> eos
    lm = ScriptedLM({6: logits_favouring((4, 5.0)), 4: logits_favouring((5, 5.0)), 5: logits_favouring((7, 5.0))})
    out = generate(lm, prompt_inputs([3]), [ROW], GenerationConfig(strategy="greedy", max_new_tokens=10, repetition_penalty=1.0), SPECIAL)
    assert out[0].token_ids == [4, 5] and out[0].finished
    assert len(lm.fed) == 3  # stopped as soon as the only row ended


def test_greedy_respects_max_new_tokens_and_masks_unk() -> None:
    lm = ScriptedLM({6: logits_favouring((1, 9.0), (4, 5.0)), 4: logits_favouring((1, 9.0), (4, 5.0))})
    out = generate(lm, prompt_inputs([3]), [ROW], GenerationConfig(strategy="greedy", max_new_tokens=4, repetition_penalty=1.0), SPECIAL)
    assert out[0].token_ids == [4, 4, 4, 4] and not out[0].finished  # <unk> (1) is never chosen


def test_unk_allowed_when_the_row_maps_it() -> None:
    lm = ScriptedLM({6: logits_favouring((1, 9.0), (7, 5.0)), 1: logits_favouring((7, 9.0))})
    row = RowSpec(answer_segment=1, ext_columns=frozenset({1}))
    out = generate(lm, prompt_inputs([3]), [row], GenerationConfig(strategy="greedy", max_new_tokens=4, repetition_penalty=1.0), SPECIAL)
    assert out[0].token_ids == [1]


def test_repetition_penalty_breaks_a_loop() -> None:
    # token 4 is slightly preferred over 5 forever; a 1.5 penalty on positive logits flips the choice once 4 was fed
    table = {t: logits_favouring((4, 2.0), (5, 1.5)) for t in (6, 4, 5)}
    plain = generate(ScriptedLM(table), prompt_inputs([3]), [ROW], GenerationConfig(strategy="greedy", max_new_tokens=3, repetition_penalty=1.0), SPECIAL)
    penalised = generate(ScriptedLM(table), prompt_inputs([3]), [ROW], GenerationConfig(strategy="greedy", max_new_tokens=3, repetition_penalty=1.5), SPECIAL)
    assert plain[0].token_ids == [4, 4, 4]
    assert penalised[0].token_ids == [4, 5, 4]  # 4 -> 2/1.5=1.33 < 1.5; then both seen: 1.33 > 1.0


def test_ext_columns_decode_to_their_base_token() -> None:
    """Choosing ext column vocab+1 feeds back its base id (1) with its sub; other rows' ext columns are masked."""
    columns = VOCAB + 2
    row_a = [-5.0] * columns
    row_a[VOCAB + 1] = 9.0
    row_a[VOCAB] = 10.0  # not this row's column: masked
    lm = ScriptedLM({6: row_a, 1: [-5.0] * 7 + [9.0] + [-5.0] * (columns - 8)}, columns=columns)
    row = RowSpec(answer_segment=1, ext_columns=frozenset({VOCAB + 1}))
    out = generate(lm, prompt_inputs([3], ext=2), [row], GenerationConfig(strategy="greedy", max_new_tokens=5, repetition_penalty=1.0), SPECIAL)
    assert out[0].token_ids == [VOCAB + 1]
    assert lm.fed[1] == [1]


def test_beam_prefers_the_length_normalised_best() -> None:
    """Two paths: bos->eos at once (logp ~ log 0.5) or bos->4->eos. With length penalty the longer, slightly less
    likely answer wins, as the original's score sum_logprobs / len**lp does."""
    lm = ScriptedLM({6: logits_favouring((7, 0.0), (4, -0.1)), 4: logits_favouring((7, 5.0))})
    cfg = GenerationConfig(strategy="beam", beam_size=2, max_new_tokens=5, repetition_penalty=1.0, length_penalty=3.0, temperature=1.0)
    out = generate(lm, prompt_inputs([3]), [ROW], cfg, SPECIAL)[0]
    assert out.token_ids == [4] and out.finished
    no_penalty = generate(lm, prompt_inputs([3]), [ROW], GenerationConfig(strategy="beam", beam_size=2, max_new_tokens=5,
                          repetition_penalty=1.0, length_penalty=0.0, temperature=1.0), SPECIAL)[0]
    assert no_penalty.token_ids == []  # immediate eos is the most likely sequence


def test_beam_forced_end_keeps_max_new_tokens() -> None:
    lm = ScriptedLM({6: logits_favouring((4, 5.0)), 4: logits_favouring((4, 5.0))})
    out = generate(lm, prompt_inputs([3]), [ROW], GenerationConfig(strategy="beam", max_new_tokens=6, repetition_penalty=1.0), SPECIAL)[0]
    assert len(out.token_ids) == 6 and not out.finished


def test_original_preset_maps_the_length_quirk() -> None:
    cfg = GenerationConfig.original(max_length=16)
    assert (cfg.max_new_tokens, cfg.beam_size, cfg.repetition_penalty, cfg.length_penalty, cfg.temperature) == (18, 3, 1.1, 3.0, 0.7)


@pytest.mark.parametrize("bad", [dict(strategy="nucleus"), dict(max_new_tokens=0), dict(beam_size=0),
                                 dict(repetition_penalty=0.9), dict(temperature=0), dict(top_p=0)])
def test_generation_config_validates(bad: dict) -> None:
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_top_p_keeps_the_smallest_sufficient_set() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.75))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(_top_p_filter(logits, 0.4))[0].tolist() == [True, False, False, False]


# ---- on a real tiny CPM-Bee ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm() -> CPMBee:
    return CPMBee(CPMBeeConfig(vocab_size=200, dim_model=32, num_heads=4, dim_head=8, dim_ff=64, num_layers=2, dtype="float32")).init_random_(1).eval()


def tiny_prompts() -> tuple[BeeInputs, list[RowSpec]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 7]
    inputs = prompt_inputs(lengths)
    inputs.input_ids = torch.randint(10, 200, inputs.input_ids.shape, generator=gen, dtype=torch.int32)
    inputs.position = torch.arange(9, dtype=torch.int32).expand(3, 9).contiguous()
    return inputs, [RowSpec(answer_segment=1, ext_columns=frozenset())] * 3


def select(inputs: BeeInputs, i: int) -> BeeInputs:
    n = int(inputs.length[i])
    return BeeInputs(**{f: (v if f.startswith("ext") else (v[i : i + 1, :n] if v.dim() == 2 and f != "segment_rel" else v[i : i + 1]))
                        for f, v in vars(inputs).items()})


TINY_SPECIAL = SpecialIds(bos=6, eos=7, unk=1, vocab_size=200)


@pytest.mark.parametrize("strategy", ["beam", "greedy", "sample"])
def test_batched_rows_equal_rows_alone(tiny_lm: CPMBee, strategy: str) -> None:
    inputs, rows = tiny_prompts()
    cfg = GenerationConfig(strategy=strategy, max_new_tokens=8, seed=5)
    rows = [RowSpec(r.answer_segment, r.ext_columns, seed=100 + i) for i, r in enumerate(rows)]
    batched = generate(tiny_lm, inputs, rows, cfg, TINY_SPECIAL)
    for i in range(3):
        alone = generate(tiny_lm, select(inputs, i), [rows[i]], cfg, TINY_SPECIAL)[0]
        assert batched[i].token_ids == alone.token_ids, f"row {i}"
        assert math.isclose(batched[i].score, alone.score, rel_tol=1e-4, abs_tol=1e-5)


def test_sampling_depends_on_the_row_seed(tiny_lm: CPMBee) -> None:
    inputs, rows = tiny_prompts()
    one = select(inputs, 1)
    cfg = GenerationConfig(strategy="sample", max_new_tokens=8, temperature=2.0, top_p=1.0)
    runs = [generate(tiny_lm, one, [RowSpec(1, frozenset(), seed=s)], cfg, TINY_SPECIAL)[0].token_ids for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) >= 2

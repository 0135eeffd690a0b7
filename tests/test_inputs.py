"""Structured-input builder and collate, on the synthetic vocabulary (no files needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from viscpm.inputs import (
    BeeInputs,
    BeeSample,
    InputError,
    build_chat_sample,
    build_context_sample,
    build_generation_sample,
    build_paint_pair,
    build_paint_sample,
    chat_data,
    collate,
    convert_data_to_id,
)
from viscpm.tokenizer import CPMBeeTokenizer, synthetic_vocab


@pytest.fixture(scope="module")
def tk() -> CPMBeeTokenizer:
    return CPMBeeTokenizer.synthetic()


# ------------------------------------------------------------------------------------- convert_data_to_id
def test_segments_and_framing(tk: CPMBeeTokenizer) -> None:
    enc = convert_data_to_id(tk, {"caption": "the cat", "objects": ""})
    assert enc.num_segments == 5  # root, key, value, key, value
    bos, eos = tk.bos_id, tk.eos_id
    for seg in enc.segments:
        ids = enc.input_ids[seg.begin : seg.end].tolist()
        assert ids[0] == bos and ids[-1] == eos
        assert (enc.segment_ids[seg.begin : seg.end] == seg.segment_id).all()
    assert enc.input_ids[:3].tolist() == [bos, tk.token_to_id("<root>"), eos]
    assert enc.input_ids[-2:].tolist() == [bos, eos]  # the empty 'objects' value
    assert (enc.context == 1).all() and enc.image_bound.shape == (0, 2)
    assert enc.input_ids.dtype == np.int32 and enc.context.dtype == np.int8


def test_segment_relations(tk: CPMBeeTokenizer) -> None:
    enc = convert_data_to_id(tk, {"caption": "x", "objects": ""})
    rel = enc.segment_rel.reshape(5, 5)
    # bucket = n_up * 8 + n_down (+1 when non-zero); segments: 0 root, 1 key, 2 value, 3 key, 4 value
    assert np.diag(rel).tolist() == [0] * 5
    assert rel[0].tolist() == [0, 2, 3, 2, 3]  # root -> key (0 up, 1 down), root -> value (0, 2)
    assert rel[1].tolist() == [9, 0, 2, 10, 11]  # key -> root (1 up), its value, sibling key (1, 1), ...
    assert rel[2].tolist() == [17, 9, 0, 18, 19]


def test_deep_nesting_clips_at_max_depth(tk: CPMBeeTokenizer) -> None:
    data: dict | str = "leaf"
    for i in range(10):
        data = {f"k{i}": data}
    enc = convert_data_to_id(tk, data, max_depth=8)  # type: ignore[arg-type]
    n = enc.num_segments
    rel = enc.segment_rel.reshape(n, n)
    assert rel[0, n - 1] == 0 * 8 + 7 + 1  # n_down clipped to max_depth - 1
    assert rel[n - 1, 0] == 7 * 8 + 0 + 1


def test_answer_slots_and_image(tk: CPMBeeTokenizer) -> None:
    enc = convert_data_to_id(tk, {"image": "<unk><unk>", "q": "a", "<ans>": {"x": "<ans_1>", "y": "<ans_2>"}})
    # answer leaves: [bos, <ans>] without eos, context 0; subs number the two placeholders 0, 1
    ans = [s for s in enc.segments if s.need_predict]
    assert len(ans) == 2
    for sub, seg in enumerate(ans):
        assert enc.input_ids[seg.begin : seg.end].tolist() == [tk.bos_id, tk.ans_id]
        assert enc.input_id_subs[seg.begin + 1] == sub
        assert (enc.context[seg.begin : seg.end] == 0).all()
    assert enc.image_bound.tolist() == [[7, 9]]
    assert enc.token_id_table == {"<ans>": {tk.vocab_size: 0, tk.vocab_size + 1: 1}}


def test_ext_state_chaining(tk: CPMBeeTokenizer) -> None:
    first = convert_data_to_id(tk, {"a": "🍕"})
    states = first.ext_states
    snapshot = (dict(states.ext_table), {k: dict(v) for k, v in states.token_id_table.items()})
    second = convert_data_to_id(tk, {"a": "🎉 🍕"}, prev_ext_states=states)
    assert (states.ext_table, states.token_id_table) == snapshot, "prev states must not be mutated"
    v = tk.vocab_size
    assert second.token_id_table == {"<unk>": {v: 0, v + 1: 1}}
    assert second.ext_table == {v: "🍕", v + 1: "🎉"}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"a": 1}, "leaves must be str"),
        ({"a": None}, "leaves must be str"),
        ({"a": ["x"]}, "leaves must be str"),
        ({"a": {"b": 2.5}}, r"\['a'\]\['b'\]"),
        ({1: "x"}, "keys must be str"),
        (["x"], "must be a dict or str"),
        ({"q": "a < b > c"}, "Invalid token"),  # trusted text: '< b >' has no base token
        ({"q": "a < b"}, "cannot tokenize"),
    ],
)
def test_bad_inputs_give_clear_errors(tk: CPMBeeTokenizer, data: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        convert_data_to_id(tk, data)  # type: ignore[arg-type]
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------------------------------------------------- chat
def test_chat_sample(tk: CPMBeeTokenizer) -> None:
    s = build_chat_sample(tk, "what is the cat", "the", query_num=5)
    # segments: 0 root, 1 'image', 2 slots, 3 'context', 4 text, 5 'question', 6 text, 7 '<ans>', 8 answer
    assert s.num_segments == 9 and s.predict_segments == [(8, 1)] and s.answer_placeholders == [[]]
    assert s.context.all() and s.context.dtype == bool
    assert s.input_ids[-3:].tolist() == [tk.bos_id, tk.ans_id, tk.eos_id]  # ends with the '<ans>' key segment
    (b, e), = s.image_bound.tolist()
    assert e - b == 5 and (s.input_ids[b:e] == tk.unk_id).all() and (s.segment_ids[b:e] == 2).all()
    assert s.ext_entries == []


def test_chat_user_text_is_escaped_by_default(tk: CPMBeeTokenizer) -> None:
    q = "Compare <unk_1> with <ans> and </s> or a < b"
    s = build_chat_sample(tk, q, "<ans_2>", query_num=2)
    assert s.predict_segments == [(8, 1)], "user text must not add answer slots"
    assert s.ext_entries == [], "escaped specials are literal text"
    q_seg = s.input_ids[s.segment_ids == 6].tolist()
    assert q_seg.count(tk.eos_id) == 1 and tk.ans_id not in q_seg and tk.unk_id not in q_seg
    assert chat_data(q)["question"] == q.replace("<", "<<")
    # the trusted path parses them (how the original behaves); '<unk_1>' becomes an ext token of <unk>
    t = build_chat_sample(tk, "Compare <unk_1>", trusted=True, query_num=2)
    assert [(e.base_id, e.sub, e.text) for e in t.ext_entries] == [(tk.unk_id, 0, "<unk_1>")]
    with pytest.raises(InputError):
        build_chat_sample(tk, "a < b", trusted=True)


def test_chat_rejects_non_str(tk: CPMBeeTokenizer) -> None:
    with pytest.raises(InputError, match="question must be str"):
        build_chat_sample(tk, 3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="context must be str"):
        build_chat_sample(tk, "q", None)  # type: ignore[arg-type]


def test_generation_sample_nested_answers(tk: CPMBeeTokenizer) -> None:
    data = {"input": "the cat", "<ans>": {"a": "", "b": {"c": ""}}}
    s = build_generation_sample(tk, data)
    assert data["<ans>"] == {"a": "", "b": {"c": ""}}, "input dict must not be modified"
    assert [a for _, a in s.predict_segments] == [1, 2]
    assert s.answer_placeholders == [["a"], ["b", "c"]]
    with pytest.raises(InputError, match="No answer"):
        build_generation_sample(tk, {"q": "x", "<ans>": {}})
    with pytest.raises(InputError):
        build_generation_sample(tk, {"q": "x"})


# --------------------------------------------------------------------------------------------------- paint
def test_paint_pair(tk: CPMBeeTokenizer) -> None:
    cond, uncond = build_paint_pair(tk, "a red car <eod>", None)
    assert uncond.input_ids.tolist() == build_paint_sample(tk, "").input_ids.tolist()
    assert cond.predict_segments == [] and cond.context.all()
    assert tk.token_to_id("<eod>") not in cond.input_ids.tolist()  # escaped by default
    raw = build_context_sample(tk, {"caption": "a red car <eod>", "objects": ""})
    assert tk.token_to_id("<eod>") in raw.input_ids.tolist()


# ------------------------------------------------------------------------------------------------- collate
def _samples(tk: CPMBeeTokenizer) -> list[BeeSample]:
    return [
        build_chat_sample(tk, "the cat 🍕 and 🎉", query_num=4),
        build_chat_sample(tk, "a", "the long context 😀 🎈 🚗 then more words here", query_num=4),
        build_paint_sample(tk, "short"),
    ]


def test_collate_padding_keeps_row_content(tk: CPMBeeTokenizer) -> None:
    samples = _samples(tk)
    batch, metas = collate(samples)
    assert isinstance(batch, BeeInputs)
    lengths = [len(s) for s in samples]
    assert batch.seq_len == max(lengths) and batch.batch_size == 3
    assert batch.length.tolist() == lengths
    for name in ("input_ids", "input_id_subs", "position", "segment_ids", "sample_ids", "num_segments",
                 "segment_rel_offset", "segment_rel", "length", "ext_table_ids", "ext_table_sub"):
        assert getattr(batch, name).dtype == torch.int32, name
    assert batch.context.dtype == torch.bool
    rel_len = max(s.segment_rel.shape[0] for s in samples)
    assert batch.segment_rel.shape == (3, rel_len)
    for r, s in enumerate(samples):
        n = len(s)
        assert batch.input_ids[r, :n].tolist() == s.input_ids.tolist()
        assert batch.input_id_subs[r, :n].tolist() == s.input_id_subs.tolist()
        assert batch.segment_ids[r, :n].tolist() == s.segment_ids.tolist()
        assert batch.context[r, :n].tolist() == s.context.tolist()
        assert batch.position[r, :n].tolist() == list(range(n))
        assert (batch.num_segments[r, :n] == s.num_segments).all()
        assert batch.segment_rel[r, : s.segment_rel.shape[0]].tolist() == s.segment_rel.tolist()
        assert not batch.segment_rel[r, s.segment_rel.shape[0] :].any()
        for name in ("input_ids", "input_id_subs", "position", "segment_ids", "num_segments", "context"):
            assert not getattr(batch, name)[r, n:].any(), f"padding of {name}"
        assert metas[r].length == n and not metas[r].truncated
        assert metas[r].image_bound.tolist() == s.image_bound.tolist()
        # a row collated alone is identical to its row in the batch
        alone, _ = collate([s])
        assert alone.input_ids[0].tolist() == batch.input_ids[r, :n].tolist()
    assert not batch.sample_ids.any() and not batch.segment_rel_offset.any()
    assert metas[0].predict_segment == 8 and metas[2].predict_segment is None


def test_collate_ext_table_maps_each_rows_strings(tk: CPMBeeTokenizer) -> None:
    samples = _samples(tk)
    batch, metas = collate(samples)
    v = tk.vocab_size
    unk = tk.unk_id
    # row 0: 🍕 (unk, sub 0), 🎉 (unk, sub 1); row 1: 😀 sub 0, 🎈 sub 1, 🚗 sub 2 -> columns (unk,1), (unk,2)
    assert batch.ext_table_ids.tolist() == [unk, unk] and batch.ext_table_sub.tolist() == [1, 2]
    assert metas[0].rev_ext_table == {unk: "🍕", v: "🎉"}
    assert metas[1].rev_ext_table == {unk: "😀", v: "🎈", v + 1: "🚗"}
    assert metas[2].rev_ext_table == {}
    # decoding a generated ext column gives the row's own string (column v means 🎉 in row 0, 🎈 in row 1)
    assert tk.decode([v], metas[0].rev_ext_table) == "🎉"
    assert tk.decode([v, v + 1], metas[1].rev_ext_table) == "🎈🚗"
    # the model side: each row's (id, sub > 0) tokens have a column
    cols = set(zip(batch.ext_table_ids.tolist(), batch.ext_table_sub.tolist()))
    for r in range(batch.batch_size):
        pairs = {(i, s) for i, s in zip(batch.input_ids[r].tolist(), batch.input_id_subs[r].tolist()) if s > 0}
        assert pairs <= cols


def test_collate_without_ext_tokens_has_empty_int32_table(tk: CPMBeeTokenizer) -> None:
    batch, _ = collate([build_paint_sample(tk, "the cat")])
    assert batch.ext_table_ids.shape == (0,) and batch.ext_table_ids.dtype == torch.int32
    assert batch.ext_table_sub.shape == (0,) and batch.ext_table_sub.dtype == torch.int32


def test_truncation(tk: CPMBeeTokenizer) -> None:
    s = build_chat_sample(tk, "the cat sat on the mat " * 5, query_num=3)
    full = len(s)
    t = s.truncate(20)
    assert len(t) == 20 and t.truncated and t.original_length == full and not s.truncated
    for name in ("input_ids", "input_id_subs", "context", "segment_ids"):
        assert getattr(t, name).tolist() == getattr(s, name)[:20].tolist(), name
    assert t.predict_segments == s.predict_segments and t.image_bound.tolist() == s.image_bound.tolist()
    assert s.truncate(full) is s
    short = build_paint_sample(tk, "a")
    batch, metas = collate([s, short], max_length=len(short) + 1)
    assert batch.seq_len == len(short) + 1 and metas[0].truncated and metas[0].original_length == full
    assert metas[0].length == len(short) + 1 and not metas[1].truncated
    built = build_chat_sample(tk, "the cat sat on the mat " * 5, query_num=3, max_length=20)
    assert built.input_ids.tolist() == t.input_ids.tolist() and built.truncated
    with pytest.raises(InputError, match="image"):
        s.truncate(5)  # would cut the image slots
    with pytest.raises(InputError):
        s.truncate(0)


def test_collate_errors_and_pad_to(tk: CPMBeeTokenizer) -> None:
    with pytest.raises(InputError):
        collate([])
    other = CPMBeeTokenizer([t for t in synthetic_vocab() if t != "丁"])
    with pytest.raises(InputError, match="vocab sizes"):
        collate([build_paint_sample(tk, "a"), build_paint_sample(other, "a")])
    batch, metas = collate([build_paint_sample(tk, "a")], pad_to=64)
    assert batch.seq_len == 64 and metas[0].length < 64 and batch.length.tolist() == [metas[0].length]
    assert batch.to("cpu").input_ids.shape == (1, 64)

"""Tokenizer and input builder against golden data recorded from the original VisCPM.

Every text, id, shape and expected value comes from the fixture folder (tokenizer.json, chat_cases.*,
paint_cases.*, chat_config.json); the tests loop over whatever cases the files hold. The fixtures were recorded
with raw (unescaped) user strings, so the builders are called with ``trusted=True`` here; where escaping is a
no-op the default (escaping) path is checked to give the same result.
"""

from __future__ import annotations

import builtins
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file

from viscpm.inputs import InputError, build_chat_sample, build_paint_pair, chat_data, collate, convert_data_to_id
from viscpm.tokenizer import CPMBeeTokenizer, escape_user_text

pytestmark = pytest.mark.parity


def _load_json(ref: Path, name: str) -> dict[str, Any]:
    path = ref / name
    if not path.is_file():
        pytest.skip(f"{name} not in the reference folder {ref}")
    return json.loads(path.read_text(encoding="utf-8"))


def _error_kind(recorded: str) -> type[BaseException]:
    """'ValueError: message' -> ValueError."""
    kind = getattr(builtins, recorded.split(":", 1)[0].strip(), None)
    assert isinstance(kind, type) and issubclass(kind, BaseException), f"unrecognised recorded error {recorded!r}"
    return kind


def _raises(fn: Callable[[], Any], kind: type[BaseException]) -> str | None:
    """None if fn raises `kind`, else a description of what happened."""
    try:
        fn()
    except kind:
        return None
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__}: {e} instead of {kind.__name__}"
    return f"did not raise {kind.__name__}"


def _str_keys(d: dict) -> dict:
    return {str(k): (_str_keys(v) if isinstance(v, dict) else v) for k, v in d.items()}


@pytest.fixture(scope="module")
def tok_ref(reference_dir: Path) -> dict[str, Any]:
    return _load_json(reference_dir, "tokenizer.json")


# ------------------------------------------------------------------------------------------------ tokenizer
def test_vocab_facts(bee_tokenizer: CPMBeeTokenizer, tok_ref: dict[str, Any]) -> None:
    tk = bee_tokenizer
    assert tk.vocab_size == tok_ref["vocab_size"]
    assert tk.max_word_len == tok_ref["max_word_len"]
    assert set(tk.special_tokens) == set(tok_ref["special_tokens_in_vocab"])
    for token, idx in tok_ref["special_tokens_in_vocab"].items():
        assert tk.token_to_id(token) == idx, token
    assert tk.token_to_id(tok_ref["bos_token"]) == tk.bos_id
    assert tk.token_to_id(tok_ref["eos_token"]) == tk.eos_id
    assert tk.token_to_id(tok_ref["unk_token"]) == tk.unk_id
    # special_ids keys are descriptive ("bos <s>", "newline (vocab line '</n>')", "<root>" ...)
    by_name = {"pad": tk.pad_id, "unk": tk.unk_id, "mask": tk.mask_id, "bos": tk.bos_id, "eos": tk.eos_id,
               "newline": tk.token_to_id("\n"), "space": tk.token_to_id(" ")}
    for key, idx in tok_ref.get("special_ids", {}).items():
        name = key.split()[0]
        if name in by_name:
            assert by_name[name] == idx, key
        elif name.startswith("<"):
            assert tk.token_to_id(name) == idx, key


def test_tokenizer_cases(bee_tokenizer: CPMBeeTokenizer, tok_ref: dict[str, Any]) -> None:
    tk = bee_tokenizer
    cases = tok_ref["cases"]
    assert cases, "tokenizer.json has no cases"
    failures: list[str] = []
    for case in cases:
        text = case["text"]
        where = f"text {text!r}"
        if "tokenize_error" in case:
            msg = _raises(lambda: tk.tokenize(text), _error_kind(case["tokenize_error"]))
            if msg:
                failures.append(f"{where}: tokenize {msg}")
        else:
            pieces = [
                {"token": t.token, "start": t.start, "is_unk": t.is_unk, "is_special": t.is_special}
                for t in tk.tokenize(text)
            ]
            if pieces != case["tokenize"]:
                failures.append(f"{where}: tokenize {pieces} != {case['tokenize']}")
        if "encode_error" in case:
            msg = _raises(lambda: tk.encode(text), _error_kind(case["encode_error"]))
            if msg:
                failures.append(f"{where}: encode {msg}")
            continue
        ids, ext = tk.encode(text)
        if ids != case["ids"]:
            failures.append(f"{where}: ids {ids} != {case['ids']}")
        if _str_keys(ext) != case["ext_table"]:
            failures.append(f"{where}: ext_table {ext} != {case['ext_table']}")
        # decode the RECORDED ids with the recorded table, so a decode check does not depend on encode
        decoded = tk.decode(case["ids"], {int(k): v for k, v in case["ext_table"].items()})
        if decoded != case["decoded"]:
            failures.append(f"{where}: decoded {decoded!r} != {case['decoded']!r}")
        if "roundtrip_equal" in case and (decoded == text) != case["roundtrip_equal"]:
            failures.append(f"{where}: roundtrip_equal differs")
    assert not failures, "\n".join(failures)


def test_convert_data_to_id_cases(bee_tokenizer: CPMBeeTokenizer, tok_ref: dict[str, Any]) -> None:
    tk = bee_tokenizer
    cases = tok_ref.get("convert_data_to_id_cases", [])
    if not cases:
        pytest.skip("tokenizer.json has no convert_data_to_id_cases")
    failures: list[str] = []
    for case in cases:
        data = case["data"]
        where = f"data {data!r}"
        if "error" in case:
            kind = _error_kind(case["error"])
            # The original asserts on non-str leaves (AssertionError) and fails inside the tokenizer on non-str
            # keys (TypeError); we raise InputError (a ValueError) with the path instead.
            expected = InputError if kind in (AssertionError, TypeError) else kind
            msg = _raises(lambda: convert_data_to_id(tk, data, max_depth=8), expected)
            if msg:
                failures.append(f"{where}: {msg}")
            continue
        enc = convert_data_to_id(tk, data, max_depth=8)
        got = {
            "input_ids": enc.input_ids.tolist(),
            "input_id_subs": enc.input_id_subs.tolist(),
            "context": enc.context.tolist(),
            "segment_ids": enc.segment_ids.tolist(),
            "segment_rel": enc.segment_rel.tolist(),
            "num_segments": enc.num_segments,
            "ext_table": _str_keys(enc.ext_table),
            "token_id_table": _str_keys(enc.token_id_table),
            # the original returns shape (0,) when there is no image; ours is (0, 2): compare the bounds
            "image_bound": enc.image_bound.tolist(),
        }
        for key, value in got.items():
            if key in case and value != case[key]:
                failures.append(f"{where}: {key} {value} != {case[key]}")
        arrays = {
            "input_ids": enc.input_ids,
            "input_id_subs": enc.input_id_subs,
            "context": enc.context,
            "segment_ids": enc.segment_ids,
            "segment_rel": enc.segment_rel,
            "image_bound": enc.image_bound,
        }
        for key, dtype in case.get("dtypes", {}).items():
            if key in arrays and arrays[key].dtype != np.dtype(dtype):
                failures.append(f"{where}: {key} dtype {arrays[key].dtype} != {dtype}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------------ chat
def _query_num(ref: Path, case: dict[str, Any]) -> int:
    query_num = int(_load_json(ref, "chat_config.json")["query_num"])
    described = case.get("data_dict_given_to_convert_data_to_id", {}).get("image", "")
    m = re.search(r"\*\s*(\d+)", described)  # e.g. "'<unk>' * 64"
    if m:
        assert int(m.group(1)) == query_num, f"image slots {described!r} vs query_num {query_num}"
    return query_num


def test_chat_inputs(bee_tokenizer: CPMBeeTokenizer, reference_dir: Path) -> None:
    tk = bee_tokenizer
    index = _load_json(reference_dir, "chat_cases.json")
    tensors = load_file(str(reference_dir / "chat_cases.safetensors"))
    assert index["cases"], "chat_cases.json has no cases"
    for k, case in enumerate(index["cases"]):
        def rec(name: str) -> np.ndarray:
            return tensors[f"case{k}.inputs.{name}"]

        query_num = _query_num(reference_dir, case)
        question, context = case["question"], case["context"]
        recorded_dict = case.get("data_dict_given_to_convert_data_to_id")
        if recorded_dict is not None:
            ours = chat_data(question, context, query_num=query_num, trusted=True)
            assert list(ours) == list(recorded_dict), f"case {k}: key order"
            assert (ours["context"], ours["question"]) == (recorded_dict["context"], recorded_dict["question"])

        sample = build_chat_sample(tk, question, context, query_num=query_num, trusted=True)
        inputs, metas = collate([sample])
        meta = metas[0]
        got = {
            "input_ids": inputs.input_ids,
            "input_id_subs": inputs.input_id_subs,
            "input_pos": inputs.position,
            "context": inputs.context,
            "segment_ids": inputs.segment_ids,
            "segment_rel": inputs.segment_rel,
            "num_segments": inputs.num_segments,
            "sample_idx": inputs.sample_ids,
            "segment_rel_offset": inputs.segment_rel_offset,
            "batch_ext_table_ids": inputs.ext_table_ids,
            "batch_ext_table_sub": inputs.ext_table_sub,
        }
        for name, value in got.items():
            expected = rec(name)
            actual = value.numpy()
            assert actual.shape == expected.shape, f"case {k} {name}: shape {actual.shape} vs {expected.shape}"
            assert np.array_equal(actual.astype(np.int64), expected.astype(np.int64)), f"case {k} {name} differs"
        assert np.array_equal(meta.image_bound[None], rec("image_bound")), f"case {k} image_bound"
        assert _str_keys(meta.rev_ext_table) == case["ext_table"], f"case {k} ext_table"
        assert [list(p) for p in meta.predict_segments] == case["predict_segments"], f"case {k} predict_segments"
        assert meta.answer_placeholders == case["answer_placeholders"], f"case {k} answer_placeholders"
        assert meta.length == case["prompt_length"] and not meta.truncated
        assert tk.vocab_size + inputs.ext_table_ids.shape[0] == case["num_logit_columns"], f"case {k} columns"

        # The production path escapes user text; it must change nothing unless the text contains '<'.
        if "<" not in question + context:
            escaped, _ = collate([build_chat_sample(tk, question, context, query_num=query_num)])
            assert np.array_equal(escaped.input_ids.numpy(), inputs.input_ids.numpy())
            assert np.array_equal(escaped.input_id_subs.numpy(), inputs.input_id_subs.numpy())
        else:
            escaped_sample = build_chat_sample(tk, question, context, query_num=query_num)
            assert escape_user_text(question) != question or escape_user_text(context) != context
            assert not any(e.text.startswith("<") and e.text.endswith(">") for e in escaped_sample.ext_entries), (
                f"case {k}: escaped user text must not produce special ext tokens"
            )


# ----------------------------------------------------------------------------------------------------- paint
def _recorded_pairs(ids: np.ndarray, subs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(s)) for i, s in zip(ids.tolist(), subs.tolist())}


def test_paint_inputs(bee_tokenizer: CPMBeeTokenizer, reference_dir: Path) -> None:
    tk = bee_tokenizer
    index = _load_json(reference_dir, "paint_cases.json")
    tensors = load_file(str(reference_dir / "paint_cases.safetensors"))
    assert index["cases"], "paint_cases.json has no cases"
    for k, case in enumerate(index["cases"]):
        cond, uncond = build_paint_pair(tk, case["prompt"], case.get("negative_prompt"), trusted=True)
        inputs, metas = collate([cond, uncond])
        padded = inputs.seq_len
        if "padded_length" in case:
            assert padded == case["padded_length"]
        ext_pairs = _recorded_pairs(inputs.ext_table_ids.numpy(), inputs.ext_table_sub.numpy())
        assert len(ext_pairs) == inputs.ext_table_ids.shape[0], "batch ext table must be deduplicated"

        for row, branch in enumerate(("cond", "uncond")):
            def rec(name: str) -> np.ndarray:
                return tensors[f"case{k}.inputs.{branch}.{name}"]

            where = f"case {k} {branch}"
            for ours_name, name in (
                ("input_ids", "input_ids"),
                ("input_id_subs", "input_id_subs"),
                ("context", "context"),
                ("segment_ids", "segment_ids"),
                ("num_segments", "num_segments"),
                ("sample_ids", "sample_ids"),
                ("segment_rel_offset", "segment_rel_offset"),
            ):
                actual = getattr(inputs, ours_name)[row : row + 1].numpy()
                expected = rec(name)
                assert actual.shape == expected.shape, f"{where} {name}: shape {actual.shape} vs {expected.shape}"
                assert np.array_equal(actual.astype(np.int64), expected.astype(np.int64)), f"{where} {name} differs"
            assert inputs.length[row].item() == int(rec("length")[0]), f"{where} length"
            if f"{branch}_length" in case:
                assert metas[row].length == case[f"{branch}_length"]

            # segment_rel: the original pads the table to max(padded length, table size); ours to the largest
            # table of the batch. Compare the common prefix; the rest must be zero on both sides.
            ours_rel = inputs.segment_rel[row].numpy()
            rec_rel = rec("segment_rel")[0]
            n = min(ours_rel.shape[0], rec_rel.shape[0])
            assert np.array_equal(ours_rel[:n], rec_rel[:n]), f"{where} segment_rel"
            assert not ours_rel[n:].any() and not rec_rel[n:].any(), f"{where} segment_rel padding"
            assert metas[row].image_bound.size == rec("image_bound").size == 0

            # Ext table: the original lists one (0-d tensor keyed) entry per occurrence, or a (0, 1) int64
            # placeholder when there is none; ours is deduplicated and may be empty. What the model sees is the
            # same: every (id, sub > 0) token of the row has a column, and the row's pairs are the recorded ones.
            ids = rec("input_ids")[0]
            subs = rec("input_id_subs")[0]
            row_pairs = {(int(i), int(s)) for i, s in zip(ids, subs) if s > 0}
            recorded = _recorded_pairs(rec("ext_table_ids"), rec("ext_table_sub"))
            if row_pairs:
                assert recorded == row_pairs, f"{where}: recorded ext {recorded} vs token pairs {row_pairs}"
            else:
                assert recorded == {(0, 1)}, f"{where}: expected the original's placeholder, got {recorded}"
            assert row_pairs <= ext_pairs, f"{where}: token pairs {row_pairs} lack ext columns {ext_pairs}"

        # The production path (escaping) is identical where the prompts contain no '<'.
        texts = case["prompt"] + (case.get("negative_prompt") or "")
        if "<" not in texts:
            esc, _ = collate(list(build_paint_pair(tk, case["prompt"], case.get("negative_prompt"))))
            assert np.array_equal(esc.input_ids.numpy(), inputs.input_ids.numpy())
            assert np.array_equal(esc.input_id_subs.numpy(), inputs.input_id_subs.numpy())

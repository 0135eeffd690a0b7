"""CPM-Bee tokenizer unit tests on the synthetic vocabulary (no files needed), plus the escaping guarantees."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from viscpm.tokenizer import CPMBeeTokenizer, Token, escape_user_text, synthetic_vocab, unescape_text


@pytest.fixture(scope="module")
def tk() -> CPMBeeTokenizer:
    return CPMBeeTokenizer.synthetic()


def pieces(tk: CPMBeeTokenizer, text: str) -> list[str]:
    return [t.token for t in tk.tokenize(text)]


# --------------------------------------------------------------------------------------------- vocabulary
def test_synthetic_vocab_layout() -> None:
    vocab = synthetic_vocab()
    assert vocab == synthetic_vocab(), "must be deterministic"
    assert vocab[:11] == [
        "<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>", "<option>",
    ]
    assert "<eod>" in vocab
    assert len(set(vocab)) == len(vocab) and all(vocab)
    assert 1000 < len(vocab) < 10000
    assert all("\n" not in t for t in vocab)
    assert " the" in vocab and " cat" in vocab and "<" in vocab and ">" in vocab and "\u4e00" in vocab


def test_ids_and_properties(tk: CPMBeeTokenizer) -> None:
    assert (tk.pad_id, tk.unk_id, tk.mask_id, tk.bos_id, tk.eos_id, tk.ans_id) == (0, 1, 2, 6, 7, 9)
    assert tk.vocab_size == len(synthetic_vocab()) == len(tk)
    assert tk.token_to_id("\n") == 4 and tk.token_to_id(" ") == 5  # re-keyed markers
    assert not tk.has_token("</n>") and not tk.has_token("</_>")
    assert tk.id_to_token(4) == "\n"
    assert "<s>" in tk.special_tokens and "<eod>" in tk.special_tokens and "<" not in tk.special_tokens


def test_from_file_matches_list(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(synthetic_vocab()), encoding="utf-8")  # no trailing newline, like bee.txt
    a, b = CPMBeeTokenizer.from_file(path), CPMBeeTokenizer.synthetic()
    text = "the cat 在 🍕 <s>"
    assert a.encode(text) == b.encode(text) and a.vocab_size == b.vocab_size


def test_bad_vocab_rejected() -> None:
    vocab = synthetic_vocab()
    with pytest.raises(ValueError, match="duplicate"):
        CPMBeeTokenizer(vocab + ["cat"])
    with pytest.raises(ValueError, match="required"):
        CPMBeeTokenizer([t for t in vocab if t != "</s>"])
    with pytest.raises(ValueError, match="empty"):
        CPMBeeTokenizer(vocab + [""])


# ----------------------------------------------------------------------------------------------- tokenize
def test_greedy_longest_match_with_leading_space(tk: CPMBeeTokenizer) -> None:
    assert pieces(tk, "the cat sat") == ["the", " cat", " s", "at"]
    # n spaces before a word: n-1 single spaces, then the word with its leading space
    assert pieces(tk, "a   cat") == ["a", " ", " ", " cat"]
    starts = [t.start for t in tk.tokenize("a   cat")]
    assert starts == [0, 1, 2, 3]


def test_unknown_runs_merge_and_ext_ids(tk: CPMBeeTokenizer) -> None:
    toks = tk.tokenize("x\t\ty🍕🎉z")
    assert [(t.token, t.is_unk) for t in toks] == [("x", False), ("\t\t", True), ("y", False), ("🍕🎉", True), ("z", False)]
    ids, ext = tk.encode("🍕 a 🎉 a 🍕")
    v = tk.vocab_size
    assert ext == {v: "🍕", v + 1: "🎉"}
    assert ids[0] == v and ids[-1] == v and ids.count(v + 1) == 1


def test_special_tokens(tk: CPMBeeTokenizer) -> None:
    ids, ext = tk.encode("<s>the</s>")
    assert ids == [tk.bos_id, tk.token_to_id("the"), tk.eos_id] and ext == {}
    ids, ext = tk.encode("<ans_1><ans><ans_1>")
    v = tk.vocab_size
    assert ids == [v, tk.ans_id, v] and ext == {v: "<ans_1>"}
    toks = tk.tokenize("a < b > c")  # raw text: '< b >' is a special token
    assert [(t.token, t.start, t.is_special) for t in toks] == [("a", 0, False), (" ", 1, False), ("< b >", 2, True), (" c", 7, False)]
    # '<>' does not close: the special token runs to the NEXT '>' (the original's quirk)
    assert [t.token for t in tk.tokenize("<>x>")] == ["<>x>"]


def test_greedy_never_matches_special_entries(tk: CPMBeeTokenizer) -> None:
    # escaped '<unk>' is literal text: '<' 'unk' ... never the special entry <unk>
    toks = tk.tokenize("<<unk>")
    assert all(not t.is_special for t in toks) and tk.unk_id not in tk.encode("<<unk>")[0]
    assert toks[0] == Token("<", 0, False, False)


def test_offsets_are_in_unescaped_text(tk: CPMBeeTokenizer) -> None:
    toks = tk.tokenize("x<<<s>y")
    assert [(t.token, t.start, t.is_special) for t in toks] == [("x", 0, False), ("<", 1, False), ("<s>", 2, True), ("y", 5, False)]


@pytest.mark.parametrize("text", ["x<y", "a < b", "<", "abc<", "<s", "<a<b>"])
def test_raw_path_rejects_bad_special_syntax(tk: CPMBeeTokenizer, text: str) -> None:
    """Why user text must be escaped: raw '<' is structure, and e.g. 'a < b' is not even valid."""
    with pytest.raises(ValueError):
        tk.encode(text)


def test_past_ext_table_is_extended_not_mutated(tk: CPMBeeTokenizer) -> None:
    ids1, ext1 = tk.encode("🍕")
    snapshot = dict(ext1)
    ids2, ext2 = tk.encode("🎉 🍕", ext1)
    assert ext1 == snapshot
    v = tk.vocab_size
    assert ids2 == [v + 1, tk.token_to_id(" "), v] and ext2 == {v: "🍕", v + 1: "🎉"}


# ------------------------------------------------------------------------------------------------- decode
def test_decode_rules(tk: CPMBeeTokenizer) -> None:
    lt = tk.token_to_id("<")
    assert tk.decode([lt]) == "<<"  # plain entries are escaped
    assert tk.decode([tk.bos_id, tk.ans_id, tk.eos_id]) == "<s><ans></s>"  # specials verbatim
    assert tk.decode([-1, tk.token_to_id("the"), -5]) == "the"  # negative ids skipped
    assert tk.decode([4, 5]) == "\n "
    v = tk.vocab_size
    assert tk.decode([v], {v: "🍕"}) == "🍕"
    with pytest.raises(ValueError):
        tk.decode([v + 3])


# ----------------------------------------------------------------------------------------------- escaping
NASTY = [
    "<",
    "<<",
    "<<<",
    "<ans>",
    "</s>",
    "<s>",
    "<unk>",
    "<unk_1>",
    "<ans_1>",
    "<root>",
    "<eod>",
    "</n>",
    "trailing <",
    "a < b > c",
    "x<y",
    "<<not special>>",
    "<>",
    "><",
    "ctrl \x00 \x07 \x1b[31m red",
    "tabs\tand\t\ttabs\r\n",
    "emoji 🍕🎉 😀 🚗 🏔",
    "中文一丁七万",
    "こんにちは 안녕하세요 ＡＢＣ",
    "",
    " ",
    "\n\n",
]


def assert_safe_roundtrip(tk: CPMBeeTokenizer, s: str) -> None:
    escaped = escape_user_text(s)
    toks = tk.tokenize(escaped)
    assert not any(t.is_special for t in toks), f"{s!r} produced a special token"
    ids, ext = tk.encode(escaped)
    special_ids = {tk.token_to_id(t) for t in tk.special_tokens}
    assert not special_ids.intersection(ids), f"{s!r} produced special ids {special_ids.intersection(ids)}"
    decoded = tk.decode(ids, ext)
    assert decoded == escaped
    assert unescape_text(decoded) == s


@pytest.mark.parametrize("s", NASTY)
def test_escaped_user_text_is_inert(tk: CPMBeeTokenizer, s: str) -> None:
    assert_safe_roundtrip(tk, s)


def test_escape_unescape() -> None:
    assert escape_user_text("a<b<<c") == "a<<b<<<<c"
    assert unescape_text(escape_user_text("a<b<<c")) == "a<b<<c"
    assert CPMBeeTokenizer.escape("<") == "<<" and CPMBeeTokenizer.unescape("<<") == "<"
    with pytest.raises(TypeError):
        escape_user_text(None)  # type: ignore[arg-type]


def test_random_strings_roundtrip(tk: CPMBeeTokenizer) -> None:
    rng = random.Random(1234)
    alphabet = list("abc tT<>/_\n\t\x00\x1b") + ["🍕", "中", "丁", "é", "<s>", "<ans>", " the", "<<"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert_safe_roundtrip(tk, s)


def test_long_text_is_fast(tk: CPMBeeTokenizer) -> None:
    unit = "The cat <ans> sat on 中文 🍕\t<unk_1> the mat. "
    s = (unit * (20000 // len(unit) + 1))[:20000]
    start = time.perf_counter()
    ids, ext = tk.encode(escape_user_text(s))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"20k characters took {elapsed:.2f}s"
    assert unescape_text(tk.decode(ids, ext)) == s


@pytest.mark.parity
@pytest.mark.parametrize("s", NASTY)
def test_escaped_user_text_is_inert_bee(bee_tokenizer: CPMBeeTokenizer, s: str) -> None:
    """The same guarantees with the real bee.txt vocabulary (skipped without the reference folder)."""
    assert_safe_roundtrip(bee_tokenizer, s)

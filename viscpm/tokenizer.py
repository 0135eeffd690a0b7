"""CPM-Bee tokenizer: special-token syntax, greedy longest-match vocabulary pieces, per-call ext tables.

Behaviour (kept identical to the original VisCPM tokenizer because the model was trained on it):

* Text is first split on special-token syntax. ``<<`` is an escaped literal ``<``; ``<`` followed by any
  other character opens a special token that runs to the next ``>`` (a ``<`` inside it, or a missing ``>``,
  is a ``ValueError``). Special tokens that are vocab entries (``<s>``, ``<unk>``, ``<ans>`` ...) map to
  their id; others (``<ans_1>``, ``< b >``) go to the ext table.
* Plain text is matched greedily, longest vocab entry first, never matching a special (``<...>``) entry.
  A character that starts no entry is unknown; runs of unknown characters become ONE unknown token.
* Unknown tokens and out-of-vocab special tokens get ids ``vocab_size + k`` in order of first appearance
  (the *ext table*, ``{id: string}``).

User-supplied text must go through :func:`escape_user_text` first, otherwise ``<`` in it is parsed as
structure (``"a < b"`` even raises). See ``viscpm.inputs`` for where that happens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

# Vocab-file spellings of the two whitespace tokens; after loading they are re-keyed to the real characters.
NEWLINE_MARKER = "</n>"
SPACE_MARKER = "</_>"

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
MASK_TOKEN = "<mask>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
ANS_TOKEN = "<ans>"
ROOT_TOKEN = "<root>"

# The first ids of bee.txt, in order; synthetic_vocab() keeps the same layout so ids agree with the real one.
_LEADING_SPECIALS = (
    "<pad>", "<unk>", "<mask>", "<sep>", NEWLINE_MARKER, SPACE_MARKER,
    "<s>", "</s>", "<root>", "<ans>", "<option>",
)


def escape_user_text(text: str) -> str:
    """Make arbitrary user text safe to embed in a CPM-Bee input: every ``<`` becomes the literal ``<<``."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return text.replace("<", "<<")


def unescape_text(text: str) -> str:
    """Inverse of :func:`escape_user_text` (on escaped text)."""
    return text.replace("<<", "<")


def _is_special_form(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


@dataclass(frozen=True)
class Token:
    """One tokenizer piece. ``start`` is the offset in the text *after* ``<<`` unescaping (as the original)."""

    token: str
    start: int
    is_unk: bool
    is_special: bool


class CPMBeeTokenizer:
    """CPM-Bee tokenizer over a vocabulary given as a list of entries (id = index).

    ``tokens`` uses the vocab-file spelling: ``</n>`` for newline and ``</_>`` for space.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        encoder: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or tok == "":
                raise ValueError(f"vocab entry {i} is empty or not a string: {tok!r}")
            if tok in encoder:
                # The original loader would silently shift ids here; refuse instead.
                raise ValueError(f"duplicate vocab entry {tok!r} at ids {encoder[tok]} and {i}")
            encoder[tok] = i
        for required in (NEWLINE_MARKER, SPACE_MARKER, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN):
            if required not in encoder:
                raise ValueError(f"vocabulary lacks the required entry {required!r}")
        for char in ("\n", " "):
            if char in encoder:
                raise ValueError(f"vocabulary has a literal {char!r} entry; use the {NEWLINE_MARKER}/{SPACE_MARKER} markers")
        encoder["\n"] = encoder.pop(NEWLINE_MARKER)
        encoder[" "] = encoder.pop(SPACE_MARKER)

        self._encoder = encoder
        self._decoder: list[str] = [""] * len(tokens)
        for tok, i in encoder.items():
            self._decoder[i] = tok
        self._special = frozenset(t for t in encoder if _is_special_form(t))
        self._max_word_len = max(len(t) for t in encoder)
        # Greedy matcher: entries that may be produced from plain text, plus for every first character the
        # candidate lengths in descending order, so each position tries only lengths that can match.
        self._normal = frozenset(t for t in encoder if t not in self._special)
        lens: dict[str, set[int]] = {}
        for t in self._normal:
            lens.setdefault(t[0], set()).add(len(t))
        self._lens_by_first: dict[str, tuple[int, ...]] = {c: tuple(sorted(v, reverse=True)) for c, v in lens.items()}

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "CPMBeeTokenizer":
        """Load a vocab file (one entry per line, id = line index; empty lines skipped like the original)."""
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # trailing newline after the last entry
        tokens = [line for line in lines if line != ""]
        if len(tokens) != len(lines):
            logger.warning("vocab %s has empty lines; they are skipped and shift the following ids", path)
        return cls(tokens)

    @classmethod
    def synthetic(cls) -> "CPMBeeTokenizer":
        """Tokenizer over :func:`synthetic_vocab` (tests, the ``tiny`` preset)."""
        return cls(synthetic_vocab())

    # ------------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def max_word_len(self) -> int:
        return self._max_word_len

    @property
    def bos_id(self) -> int:
        return self._encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    @property
    def unk_id(self) -> int:
        return self._encoder[UNK_TOKEN]

    @property
    def pad_id(self) -> int:
        return self._encoder[PAD_TOKEN]

    @property
    def mask_id(self) -> int:
        return self._encoder[MASK_TOKEN]

    @property
    def ans_id(self) -> int:
        return self._encoder[ANS_TOKEN]

    @property
    def special_tokens(self) -> frozenset[str]:
        """Vocab entries of the form ``<...>``: emitted verbatim by decode, never produced from plain text."""
        return self._special

    def has_token(self, token: str) -> bool:
        return token in self._encoder

    def token_to_id(self, token: str) -> int:
        """Id of a vocab entry (newline/space by their real characters). KeyError if absent."""
        return self._encoder[token]

    def id_to_token(self, token_id: int) -> str:
        return self._decoder[token_id]

    escape = staticmethod(escape_user_text)
    unescape = staticmethod(unescape_text)

    # ------------------------------------------------------------------------------------------- tokenizing
    @staticmethod
    def _split_special(text: str) -> list[str]:
        """Split into [plain, special, plain, special, ..., plain]; plain parts have ``<<`` unescaped."""
        parts: list[str] = []
        plain: list[str] = []
        pos, n = 0, len(text)
        while True:
            j = text.find("<", pos)
            if j < 0:
                plain.append(text[pos:])
                break
            plain.append(text[pos:j])
            if j + 1 >= n:
                raise ValueError(f"Unexpected end of text `{text}`")
            if text[j + 1] == "<":
                plain.append("<")
                pos = j + 2
                continue
            # A special token: its second character is taken as-is (even '>'), then it runs to the next '>'.
            close = text.find(">", j + 2)
            inner_lt = text.find("<", j + 2)
            if inner_lt >= 0 and (close < 0 or inner_lt < close):
                raise ValueError(f"Invalid special token at pos {inner_lt}")
            if close < 0:
                raise ValueError(f"Unexpected end of text `{text}`")
            parts.append("".join(plain))
            parts.append(text[j : close + 1])
            plain = []
            pos = close + 1
        parts.append("".join(plain))
        return parts

    def _match_len(self, text: str, i: int) -> int:
        """Length of the longest non-special vocab entry starting at text[i], 0 if none."""
        cands = self._lens_by_first.get(text[i])
        if cands is None:
            return 0
        remaining = len(text) - i
        normal = self._normal
        for length in cands:
            if length <= remaining and text[i : i + length] in normal:
                return length
        return 0

    def tokenize(self, text: str) -> list[Token]:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        out: list[Token] = []
        offset = 0
        for k, part in enumerate(self._split_special(text)):
            if k % 2 == 1:
                out.append(Token(part, offset, False, True))
            else:
                i, n = 0, len(part)
                unk_start = -1
                while i < n:
                    length = self._match_len(part, i)
                    if length == 0:
                        if unk_start < 0:
                            unk_start = i
                        i += 1
                        continue
                    if unk_start >= 0:
                        out.append(Token(part[unk_start:i], offset + unk_start, True, False))
                        unk_start = -1
                    out.append(Token(part[i : i + length], offset + i, False, False))
                    i += length
                if unk_start >= 0:
                    out.append(Token(part[unk_start:], offset + unk_start, True, False))
            offset += len(part)
        return out

    def encode(self, text: str, past_ext_table: Mapping[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
        """Ids of ``text`` and the ext table ``{id: string}`` (``past_ext_table`` extended, never mutated)."""
        ext_table: dict[int, str] = dict(past_ext_table or {})
        ext_rev: dict[str, int] = {s: i for i, s in ext_table.items()}
        ids: list[int] = []
        for tok in self.tokenize(text):
            if tok.is_unk or (tok.is_special and tok.token not in self._encoder):
                ext_id = ext_rev.get(tok.token)
                if ext_id is None:
                    # Same numbering as the original: next id = vocab_size + number of known ext strings.
                    ext_id = self.vocab_size + len(ext_rev)
                    ext_rev[tok.token] = ext_id
                    ext_table[ext_id] = tok.token
                ids.append(ext_id)
            else:
                ids.append(self._encoder[tok.token])
        return ids, ext_table

    def decode(self, ids: Sequence[int], ext_table: Mapping[int, str] | None = None) -> str:
        """Text of ``ids``. Ext ids map through ``ext_table``; special entries are emitted verbatim, every other
        entry with ``<`` escaped (so the result re-encodes to the same ids); negative ids are skipped."""
        ext_table = ext_table or {}
        out: list[str] = []
        for raw in ids:
            token_id = int(raw)
            if token_id in ext_table:
                out.append(ext_table[token_id])
            elif token_id >= 0:
                if token_id >= self.vocab_size:
                    raise ValueError(f"id {token_id} is neither a vocab id nor in the ext table")
                word = self._decoder[token_id]
                out.append(word if word in self._special else escape_user_text(word))
        return "".join(out)


# --------------------------------------------------------------------------------------- synthetic vocab
_SYNTH_WORDS = """
the of and to in is was for that on as with by at from his her he she it they we you i be are this an or not
but had have has were which one all their there been if more when will would who so no what up out about into
than them can only other new some could time these two may then do first any my now such like our over man me
even most made after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get here between
both life being under never day same another know while last might us great old year off come since against go
came right used take three cat dog car red blue green white black big small photo picture image color table
wood wooden sitting standing on road mountain sea beach water tree sky sun high quality painting style art
describe detail question answer what where why look see show animal bird flower house city street room
person woman child face hand light dark day night
""".split()
_SYNTH_PIECES = (
    "ing ed er es s ly tion ment ness able al ic ous ive ful less est en re un in dis pre th sh ch st qu "
    "an ar at or on om ow ou ea ee oo ll ss tt pp 00 10 12 20 .. ... ?? !! ,\" .\""
).split()


def synthetic_vocab(num_cjk: int = 2000) -> list[str]:
    """A deterministic small vocabulary in the bee.txt format (vocab-file spelling, id = index).

    Ids 0..10 are the same special entries as bee.txt; then printable ASCII (no whitespace: space and newline
    are the ``</_>``/``</n>`` entries), English word pieces (bare and with a leading space), ``<eod>``, and
    ``num_cjk`` consecutive CJK ideographs from U+4E00. Tabs, emoji, kana etc. are unknown.
    """
    out: list[str] = list(_LEADING_SPECIALS)
    seen = set(out)

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            out.append(tok)

    for code in range(0x21, 0x7F):
        add(chr(code))
    for w in _SYNTH_WORDS:
        add(w)
        add(" " + w)
        add(" " + w.capitalize())
        add(w.capitalize())
    for p in _SYNTH_PIECES:
        add(p)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        add(" " + c)
    add("<eod>")
    for code in range(0x4E00, 0x4E00 + num_cjk):
        add(chr(code))
    return out

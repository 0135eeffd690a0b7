"""Structured CPM-Bee inputs: a nested dict -> token ids, subs, segments, segment relations, ext tables.

CPM-Bee reads a *tree* of text: every key and every leaf of a nested dict is its own segment, wrapped in
``<s> ... </s>``. Attention inside a segment uses relative positions; across segments it uses a bucket
that encodes how far up and down the tree the two segments are apart (``segment_rel``).

``BeeInputs`` is the batched, padded tensor form the model consumes.

Pipeline: ``chat_data``/``paint_data`` (user text, escaped) -> ``convert_data_to_id`` (trusted strings ->
one encoded tree) -> ``build_*_sample`` (model-ready row, ``BeeSample``) -> ``collate`` (``BeeInputs`` +
per-row ``RowMeta`` for decoding).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .tokenizer import ANS_TOKEN, UNK_TOKEN, CPMBeeTokenizer, escape_user_text

logger = logging.getLogger(__name__)


@dataclass
class BeeInputs:
    """A batch of B CPM-Bee sequences, right-padded to a common length L.

    Padding positions have ``length`` <= index; the model masks them as keys (and their own attention output
    is zero), so padding never changes a valid row's result.

    Shapes: B = batch, L = padded length, R = padded size of the flattened segment-relation table,
    E = number of extra logit columns (ext table).
    """

    input_ids: torch.Tensor  # (B, L) int32: vocab ids; unknown text and out-of-vocab specials re-id'd to a base id
    input_id_subs: torch.Tensor  # (B, L) int32: sub index of ext tokens (rotates the embedding); 0 for plain ids
    position: torch.Tensor  # (B, L) int32: position used for the in-segment relative position bucket
    context: torch.Tensor  # (B, L) bool: True = visible to every token; False = causal (answer) token
    segment_ids: torch.Tensor  # (B, L) int32: segment index of each token
    sample_ids: torch.Tensor  # (B, L) int32: 0 for the main sample, i > 0 for in-context samples
    num_segments: torch.Tensor  # (B, L) int32: number of segments of the token's sample
    segment_rel_offset: torch.Tensor  # (B, L) int32: offset of the token's sample table inside segment_rel
    segment_rel: torch.Tensor  # (B, R) int32: flattened n_seg x n_seg relation buckets, zero-padded
    length: torch.Tensor  # (B,) int32: number of valid (non-padding) tokens per row
    ext_table_ids: torch.Tensor  # (E,) int32: base id of each extra logit column
    ext_table_sub: torch.Tensor  # (E,) int32: sub index of each extra logit column

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> "BeeInputs":
        return BeeInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# ======================================================================================================
# Building samples: nested dict -> one sequence (numpy), then collate -> BeeInputs.
#
# Faithful to the original VisCPM (convert_data_to_id / _convert_to_tensors / _process_list) where the
# results feed the model; deliberate differences are commented where they occur.
# ======================================================================================================

ROOT_VALUE = "<root>"
IMAGE_KEY = "image"
DEFAULT_MAX_DEPTH = 8


class InputError(ValueError):
    """A structured input that cannot be encoded (bad types, invalid special tokens, no answer slot ...)."""


@dataclass
class ExtStates:
    """Ext-table state that carries over between ``convert_data_to_id`` calls (in-context samples).

    ``ext_table``: ext id -> string (tokenizer ids >= vocab_size). ``token_id_table``: base token name
    (``<unk>``, ``<ans>`` ...) -> {ext id: sub index}, subs numbered per base token from 0.
    """

    ext_table: dict[int, str]
    token_id_table: dict[str, dict[int, int]]


@dataclass
class SegmentInfo:
    """One node of the input tree (a key, a leaf value, or the root)."""

    segment_id: int
    value: str
    depth: int
    path: tuple[int, ...]  # segment ids from the root down to this node (inclusive)
    need_predict: bool  # leaf under the top-level "<ans>" key: [bos, ...] without eos, context 0
    is_image: bool  # leaf under the top-level "image" key: its inner tokens are replaced by vision states
    begin: int = 0  # token range [begin, end) in the sequence
    end: int = 0


@dataclass
class EncodedSample:
    """Output of :func:`convert_data_to_id` (one tree, not yet prepared for generation)."""

    input_ids: np.ndarray  # (L,) int32, ext tokens re-id'd to their base token
    input_id_subs: np.ndarray  # (L,) int32
    context: np.ndarray  # (L,) int8: 1 = context, 0 = answer slot
    segment_ids: np.ndarray  # (L,) int32
    segment_rel: np.ndarray  # (num_segments**2,) int32, row-major [query segment, key segment]
    num_segments: int
    ext_table: dict[int, str]
    token_id_table: dict[str, dict[int, int]]
    image_bound: np.ndarray  # (n_images, 2) int32: [begin, end) of each image leaf's inner tokens
    segments: list[SegmentInfo]

    @property
    def ext_states(self) -> ExtStates:
        return ExtStates(self.ext_table, self.token_id_table)


class ExtEntry(NamedTuple):
    """An ext token of a sample: embedding (base_id, sub) and the string it stands for."""

    base_id: int
    sub: int
    text: str


@dataclass
class BeeSample:
    """One model-ready row (before padding): what collate batches."""

    input_ids: np.ndarray  # (L,) int32
    input_id_subs: np.ndarray  # (L,) int32
    context: np.ndarray  # (L,) bool
    segment_ids: np.ndarray  # (L,) int32
    segment_rel: np.ndarray  # (num_segments**2,) int32
    num_segments: int
    image_bound: np.ndarray  # (n_images, 2) int32
    ext_entries: list[ExtEntry]  # in the original's token_id_table order; the "<ans>" placeholders excluded
    vocab_size: int
    predict_segments: list[tuple[int, int]] = field(default_factory=list)  # (segment id, answer id)
    answer_placeholders: list[list[str]] = field(default_factory=list)  # path inside data["<ans>"] per answer id
    truncated: bool = False
    original_length: int = -1  # length before truncation (-1: set from input_ids)

    def __post_init__(self) -> None:
        if self.original_length < 0:
            self.original_length = len(self.input_ids)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def truncate(self, max_length: int) -> "BeeSample":
        """Keep the first ``max_length`` tokens; ids, subs, context and segments are cut together.

        (The original's max_inp_length forgets input_id_subs.) An image whose slots would be cut raises
        InputError: its vision states could not be placed. Ext entries are kept, as the original keeps them
        in the decode table.
        """
        if max_length <= 0:
            raise InputError(f"max_length must be positive, got {max_length}")
        if len(self) <= max_length:
            return self
        if self.image_bound.size and int(self.image_bound[:, 1].max()) > max_length:
            raise InputError(
                f"max_length {max_length} would cut the image slots {self.image_bound.tolist()}; raise max_length"
            )
        logger.warning("truncating a sample from %d to %d tokens", len(self), max_length)
        return BeeSample(
            input_ids=self.input_ids[:max_length].copy(),
            input_id_subs=self.input_id_subs[:max_length].copy(),
            context=self.context[:max_length].copy(),
            segment_ids=self.segment_ids[:max_length].copy(),
            segment_rel=self.segment_rel,
            num_segments=self.num_segments,
            image_bound=self.image_bound,
            ext_entries=list(self.ext_entries),
            vocab_size=self.vocab_size,
            predict_segments=list(self.predict_segments),
            answer_placeholders=list(self.answer_placeholders),
            truncated=True,
            original_length=self.original_length,
        )


@dataclass
class RowMeta:
    """Per-row information collate returns next to BeeInputs (what decoding needs)."""

    length: int  # true (unpadded) length
    predict_segment: int | None  # segment id of the first answer slot (decode in this segment); None for Paint
    predict_segments: list[tuple[int, int]]  # all (segment id, answer id) pairs
    answer_placeholders: list[list[str]]
    rev_ext_table: dict[int, str]  # logit column / base id -> string, for tokenizer.decode
    image_bound: np.ndarray  # (n_images, 2) int32, positions in this row
    truncated: bool
    original_length: int


# ----------------------------------------------------------------------------------- convert_data_to_id
def _rel_bucket(n_up: int, n_down: int, max_depth: int) -> int:
    bucket = n_up * max_depth + n_down
    return 0 if bucket == 0 else bucket + 1  # bucket 1 is reserved for other (in-context) samples


def _build_tree(data: Any, max_depth: int) -> tuple[list[SegmentInfo], np.ndarray]:
    """Depth-first segments (root first, each key before its value) and the flattened relation table."""
    segments: list[SegmentInfo] = [SegmentInfo(0, ROOT_VALUE, 0, (0,), False, False)]

    def visit(node: Any, depth: int, parent: tuple[int, ...], need_predict: bool, is_image: bool, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise InputError(f"keys must be str; got {type(key).__name__} {key!r} at {where or 'top level'}")
                seg = SegmentInfo(len(segments), key, depth, parent + (len(segments),), False, False)
                segments.append(seg)
                visit(
                    value,
                    depth + 1,
                    seg.path,
                    need_predict or (depth == 1 and key == ANS_TOKEN),
                    is_image or (depth == 1 and key == IMAGE_KEY),
                    f"{where}[{key!r}]",
                )
        elif isinstance(node, str):
            segments.append(SegmentInfo(len(segments), node, depth, parent + (len(segments),), need_predict, is_image))
        else:
            raise InputError(f"leaves must be str (or dict); got {type(node).__name__} at data{where}")

    visit(data, 1, (0,), False, False, "")

    # Relation of segments a != b: n_up = steps from a up to their lowest common ancestor, n_down = steps from
    # there down to b (each clipped to max_depth - 1). Same values as the original's recursive construction.
    n = len(segments)
    rel = np.zeros((n, n), dtype=np.int32)
    for a in segments:
        for b in segments:
            if a.segment_id == b.segment_id:
                continue
            common = 0
            for x, y in zip(a.path, b.path):
                if x != y:
                    break
                common += 1
            lca_depth = common - 1
            n_up = min(a.depth - lca_depth, max_depth - 1)
            n_down = min(b.depth - lca_depth, max_depth - 1)
            rel[a.segment_id, b.segment_id] = _rel_bucket(n_up, n_down, max_depth)
    return segments, rel.reshape(-1)


def _base_token_name(token: str) -> str:
    """Base vocab token of an ext string: ``<name_x>`` -> ``<name>``, ``<name>`` -> itself, text -> ``<unk>``."""
    if token.startswith("<") and token.endswith(">"):
        inner = token[1:-1]
        return "<" + inner.split("_", 1)[0] + ">" if "_" in inner else token
    return UNK_TOKEN


def convert_data_to_id(
    tokenizer: CPMBeeTokenizer,
    data: Mapping[str, Any] | str,
    max_depth: int = DEFAULT_MAX_DEPTH,
    prev_ext_states: ExtStates | None = None,
) -> EncodedSample:
    """Encode a nested dict of TRUSTED (already escaped) strings; keys are encoded as text too.

    Every segment is ``[bos] + tokens + [eos]``; leaves under the top-level ``<ans>`` key have no eos and
    context 0. Ext tokens are re-id'd to their base token with a sub index (first appearance per base token,
    starting at 0). The original's optional answer shuffling is not supported (never used for inference).
    ``prev_ext_states`` is not mutated.
    """
    if not isinstance(data, (dict, str)):
        raise InputError(f"data must be a dict or str, got {type(data).__name__}")
    segments, segment_rel = _build_tree(data, max_depth)

    ext_table: dict[int, str] = dict(prev_ext_states.ext_table) if prev_ext_states else {}
    token_id_table: dict[str, dict[int, int]] = (
        {k: dict(v) for k, v in prev_ext_states.token_id_table.items()} if prev_ext_states else {}
    )
    ids: list[int] = []
    subs: list[int] = []
    image_bound: list[tuple[int, int]] = []
    for seg in segments:
        try:
            raw_ids, ext_table = tokenizer.encode(seg.value, ext_table)
        except ValueError as e:
            raise InputError(f"cannot tokenize segment {seg.segment_id} {seg.value[:50]!r}: {e}") from e
        seg.begin = len(ids)
        ids.append(tokenizer.bos_id)
        subs.append(0)
        for idx in raw_ids:
            text = ext_table.get(idx)
            if text is None:
                ids.append(idx)
                subs.append(0)
                continue
            name = _base_token_name(text)
            if not tokenizer.has_token(name):
                raise InputError(f"Invalid token {text}")
            table = token_id_table.setdefault(name, {})
            sub = table.setdefault(idx, len(table))
            ids.append(tokenizer.token_to_id(name))
            subs.append(sub)
        if not seg.need_predict:
            ids.append(tokenizer.eos_id)
            subs.append(0)
        seg.end = len(ids)
        if seg.is_image:
            image_bound.append((seg.begin + 1, seg.end - 1))

    length = len(ids)
    context = np.ones(length, dtype=np.int8)
    segment_ids = np.zeros(length, dtype=np.int32)
    for seg in segments:
        segment_ids[seg.begin : seg.end] = seg.segment_id
        if seg.need_predict:
            context[seg.begin : seg.end] = 0
    return EncodedSample(
        input_ids=np.asarray(ids, dtype=np.int32),
        input_id_subs=np.asarray(subs, dtype=np.int32),
        context=context,
        segment_ids=segment_ids,
        segment_rel=segment_rel,
        num_segments=len(segments),
        ext_table=ext_table,
        token_id_table=token_id_table,
        image_bound=np.asarray(image_bound, dtype=np.int32).reshape(-1, 2),
        segments=segments,
    )


def _ext_entries(tokenizer: CPMBeeTokenizer, enc: EncodedSample) -> list[ExtEntry]:
    out: list[ExtEntry] = []
    for name, mapping in enc.token_id_table.items():
        if name == ANS_TOKEN:  # answer placeholders are never decoded
            continue
        base = tokenizer.token_to_id(name)
        for ext_id, sub in mapping.items():
            out.append(ExtEntry(base, sub, enc.ext_table[ext_id]))
    return out


# ----------------------------------------------------------------------------------------- sample builders
def build_generation_sample(
    tokenizer: CPMBeeTokenizer,
    data: Mapping[str, Any],
    *,
    max_length: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> BeeSample:
    """A prompt with answer slots (TRUSTED strings; ``data`` is not modified).

    Every leaf under ``data["<ans>"]`` becomes an answer slot ``<ans_i>``; the slots' tokens (context 0) are
    removed and recorded as ``predict_segments`` [(segment id, i)], as the original's generation code does.
    """
    if not isinstance(data, dict) or ANS_TOKEN not in data:
        raise InputError(f"generation data must be a dict with a {ANS_TOKEN!r} key")
    placeholders: list[list[str]] = []

    def put(node: Any, path: list[str]) -> Any:
        if isinstance(node, dict):
            return {k: put(v, path + [k]) for k, v in node.items()}
        placeholders.append(path)
        return f"<ans_{len(placeholders)}>"

    data = copy.copy(data)  # shallow: only the "<ans>" value is replaced
    data[ANS_TOKEN] = put(data[ANS_TOKEN], [])
    enc = convert_data_to_id(tokenizer, data, max_depth=max_depth)

    # sub index of each "<ans_i>" placeholder -> i
    sub_to_answer: dict[int, int] = {}
    for ext_id, sub in enc.token_id_table.get(ANS_TOKEN, {}).items():
        text = enc.ext_table[ext_id]
        if text.startswith("<ans_") and text.endswith(">"):
            try:
                sub_to_answer[sub] = int(text[5:-1])
            except ValueError:
                pass  # e.g. "<ans_x>" in trusted text: a plain ext token, not a slot
    keep = enc.context != 0
    predict_segments: list[tuple[int, int]] = []
    ans_id = tokenizer.ans_id
    for i in np.flatnonzero(~keep):
        if enc.input_ids[i] == ans_id:
            sub = int(enc.input_id_subs[i])
            if sub not in sub_to_answer:
                raise InputError(f"answer slot token with unknown sub {sub}")
            predict_segments.append((int(enc.segment_ids[i]), sub_to_answer[sub]))
    if not predict_segments:
        raise InputError("No answer to predict")
    # Image bounds shift when answer slots before them are removed.
    removed_before = np.cumsum(~keep)
    image_bound = enc.image_bound.copy()
    for row in image_bound:
        row -= removed_before[row[0] - 1] if row[0] > 0 else 0
    sample = BeeSample(
        input_ids=enc.input_ids[keep],
        input_id_subs=enc.input_id_subs[keep],
        context=np.ones(int(keep.sum()), dtype=bool),
        segment_ids=enc.segment_ids[keep],
        segment_rel=enc.segment_rel,
        num_segments=enc.num_segments,
        image_bound=image_bound,
        ext_entries=_ext_entries(tokenizer, enc),
        vocab_size=tokenizer.vocab_size,
        predict_segments=predict_segments,
        answer_placeholders=placeholders,
    )
    return sample.truncate(max_length) if max_length is not None else sample


def build_context_sample(
    tokenizer: CPMBeeTokenizer,
    data: Mapping[str, Any] | str,
    *,
    max_length: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> BeeSample:
    """A sample used as-is (TRUSTED strings), e.g. Paint's text condition: no answer slots removed."""
    enc = convert_data_to_id(tokenizer, data, max_depth=max_depth)
    sample = BeeSample(
        input_ids=enc.input_ids,
        input_id_subs=enc.input_id_subs,
        context=enc.context != 0,
        segment_ids=enc.segment_ids,
        segment_rel=enc.segment_rel,
        num_segments=enc.num_segments,
        image_bound=enc.image_bound,
        ext_entries=_ext_entries(tokenizer, enc),
        vocab_size=tokenizer.vocab_size,
    )
    return sample.truncate(max_length) if max_length is not None else sample


def _user_str(value: Any, what: str, trusted: bool) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be str, got {type(value).__name__}")
    return value if trusted else escape_user_text(value)


def chat_data(question: str, context: str = "", *, query_num: int = 64, trusted: bool = False) -> dict[str, str]:
    """The VisCPM-Chat input tree: ``query_num`` ``<unk>`` image slots, context, question, an answer slot.

    ``question``/``context`` are user text and escaped unless ``trusted`` (then ``<`` is special syntax)."""
    if query_num <= 0:
        raise InputError(f"query_num must be positive, got {query_num}")
    return {
        IMAGE_KEY: UNK_TOKEN * query_num,
        "context": _user_str(context, "context", trusted),
        "question": _user_str(question, "question", trusted),
        ANS_TOKEN: "",
    }


def paint_data(prompt: str, *, trusted: bool = False) -> dict[str, str]:
    """The VisCPM-Paint input tree ``{'caption': prompt, 'objects': ''}`` (prompt escaped unless trusted)."""
    return {"caption": _user_str(prompt, "prompt", trusted), "objects": ""}


def build_chat_sample(
    tokenizer: CPMBeeTokenizer,
    question: str,
    context: str = "",
    *,
    query_num: int = 64,
    trusted: bool = False,
    max_length: int | None = None,
) -> BeeSample:
    """One VisCPM-Chat prompt (image slots + context + question), answer slot removed, ready for collate."""
    return build_generation_sample(
        tokenizer, chat_data(question, context, query_num=query_num, trusted=trusted), max_length=max_length
    )


def build_paint_sample(
    tokenizer: CPMBeeTokenizer, prompt: str, *, trusted: bool = False, max_length: int | None = None
) -> BeeSample:
    """One VisCPM-Paint text condition."""
    return build_context_sample(tokenizer, paint_data(prompt, trusted=trusted), max_length=max_length)


def build_paint_pair(
    tokenizer: CPMBeeTokenizer,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    trusted: bool = False,
    max_length: int | None = None,
) -> tuple[BeeSample, BeeSample]:
    """(cond, uncond) samples for classifier-free guidance; uncond uses the negative prompt or ''."""
    cond = build_paint_sample(tokenizer, prompt, trusted=trusted, max_length=max_length)
    uncond = build_paint_sample(
        tokenizer, "" if negative_prompt is None else negative_prompt, trusted=trusted, max_length=max_length
    )
    return cond, uncond


# ------------------------------------------------------------------------------------------------- collate
def collate(
    samples: Sequence[BeeSample], *, max_length: int | None = None, pad_to: int | None = None
) -> tuple[BeeInputs, list[RowMeta]]:
    """Right-pad samples into one BeeInputs batch plus per-row metadata.

    Padding: ids/subs/segments/num_segments 0, context False, position 0; ``length`` holds the true lengths;
    ``segment_rel`` is zero-padded to the largest table; ``sample_ids``/``segment_rel_offset`` are 0.
    Ext tokens with sub > 0 get batch-level logit columns ``vocab_size + j``, shared by all rows and deduped by
    (base id, sub) in order of first appearance (as the original's _process_list); each row's
    ``rev_ext_table`` maps those columns (and the base ids of its sub-0 ext tokens, the original's quirk) to
    that row's own strings. ``max_length`` truncates rows first; ``pad_to`` is a minimum padded length.
    """
    if len(samples) == 0:
        raise InputError("collate needs at least one sample")
    vocab_sizes = {s.vocab_size for s in samples}
    if len(vocab_sizes) != 1:
        raise InputError(f"samples come from tokenizers with different vocab sizes {sorted(vocab_sizes)}")
    vocab_size = vocab_sizes.pop()
    if max_length is not None:
        samples = [s.truncate(max_length) for s in samples]

    batch = len(samples)
    seq_len = max(max(len(s) for s in samples), pad_to or 0)
    rel_len = max(int(s.segment_rel.shape[0]) for s in samples)
    input_ids = np.zeros((batch, seq_len), dtype=np.int32)
    input_id_subs = np.zeros((batch, seq_len), dtype=np.int32)
    position = np.zeros((batch, seq_len), dtype=np.int32)
    context = np.zeros((batch, seq_len), dtype=bool)
    segment_ids = np.zeros((batch, seq_len), dtype=np.int32)
    num_segments = np.zeros((batch, seq_len), dtype=np.int32)
    segment_rel = np.zeros((batch, rel_len), dtype=np.int32)
    length = np.zeros((batch,), dtype=np.int32)

    column_of: dict[tuple[int, int], int] = {}
    ext_ids: list[int] = []
    ext_subs: list[int] = []
    metas: list[RowMeta] = []
    for r, s in enumerate(samples):
        n = len(s)
        input_ids[r, :n] = s.input_ids
        input_id_subs[r, :n] = s.input_id_subs
        position[r, :n] = np.arange(n, dtype=np.int32)
        context[r, :n] = s.context
        segment_ids[r, :n] = s.segment_ids
        num_segments[r, :n] = s.num_segments
        segment_rel[r, : s.segment_rel.shape[0]] = s.segment_rel
        length[r] = n

        rev: dict[int, str] = {}
        for entry in s.ext_entries:
            if entry.sub > 0:
                key = (entry.base_id, entry.sub)
                if key not in column_of:
                    column_of[key] = vocab_size + len(ext_ids)
                    ext_ids.append(entry.base_id)
                    ext_subs.append(entry.sub)
                rev[column_of[key]] = entry.text
            else:
                rev[entry.base_id] = entry.text
        metas.append(
            RowMeta(
                length=n,
                predict_segment=s.predict_segments[0][0] if s.predict_segments else None,
                predict_segments=list(s.predict_segments),
                answer_placeholders=list(s.answer_placeholders),
                rev_ext_table=rev,
                image_bound=s.image_bound.copy(),
                truncated=s.truncated,
                original_length=s.original_length,
            )
        )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    inputs = BeeInputs(
        input_ids=t(input_ids),
        input_id_subs=t(input_id_subs),
        position=t(position),
        context=t(context),
        segment_ids=t(segment_ids),
        sample_ids=torch.zeros((batch, seq_len), dtype=torch.int32),
        num_segments=t(num_segments),
        segment_rel_offset=torch.zeros((batch, seq_len), dtype=torch.int32),
        segment_rel=t(segment_rel),
        length=t(length),
        ext_table_ids=torch.tensor(ext_ids, dtype=torch.int32),
        ext_table_sub=torch.tensor(ext_subs, dtype=torch.int32),
    )
    return inputs, metas

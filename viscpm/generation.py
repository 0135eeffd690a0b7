"""Decoding for CPM-Bee: the original VisCPM beam search (exactly), greedy, and top-p sampling.

All strategies run a batch of prompts at once on the model's static decoding state (`CPMBee.start_decoding`):
each prompt is prefilled once and its beams share its prompt cache; every row's result is the same as running it
alone. The per-step bookkeeping (beams, hypotheses, finished rows) stays on the device: per step at most one
small host read ("is every row done?"), nothing per row or per candidate.

The original's beam search, reproduced here (`VLLMCPMBeeBeamSearch._decode`):

1. raw logits; the `<unk>` column is set to -10000 unless the row's ext table maps `<unk>` to a string,
   ext columns that are not the row's own are set to -10000;
2. repetition penalty (CTRL style: negative logits * p, others / p) on every distinct id fed after the
   prompt - the bos that opens the answer and the generated tokens, ext tokens through their base id;
3. / temperature, log_softmax, + running beam score (beams start at [0, -1e9, ...]);
4. top 2*beam_size over beam x vocab; candidates in order: eos, or the last step, ends a hypothesis (score =
   sum_logprobs / len ** length_penalty); others continue until beam_size beams are kept;
5. a row is done when it has beam_size hypotheses and none of its beams can still beat the worst.

`max_new_tokens` counts every answer token a hypothesis may hold. The original's `max_length=L` lets
hypotheses grow to L + 2 tokens (it adds 1 inside and loops inclusively); `GenerationConfig.original(L)`
maps that to `max_new_tokens = L + 2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .cpmbee import CPMBee
from .inputs import BeeInputs

MASKED_LOGIT = -10000.0  # the original overwrites disallowed columns with this value (not -inf)
# steps between the host reads of "is every row done?": extra steps after the end change no result, and a read
# every step would stall the GPU queue once per step
_DONE_CHECK_EVERY = 1  # beam search: its per-step bookkeeping needs no other read, and beams end at different steps
_FINISHED_CHECK_EVERY_GPU = 8  # greedy / sampling on a GPU


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    unk: int
    vocab_size: int


@dataclass
class RowSpec:
    """What decoding needs to know about one prompt row."""

    answer_segment: int  # segment id the answer tokens belong to
    ext_columns: frozenset[int]  # logit columns / base ids the row's ext table maps to strings
    seed: int | None = None  # `sample` only


@dataclass
class Generated:
    token_ids: list[int]  # raw logit columns (>= vocab_size for ext tokens), eos removed
    finished: bool  # ended with eos (False: stopped at max_new_tokens)
    score: float  # beam: length-normalised log-prob of the hypothesis; others: sum of log-probs


# ---- shared per-step logit processing -----------------------------------------------------------------
@dataclass
class _Blocked:
    """Columns set to MASKED_LOGIT per row: `<unk>` (B,) and the ext columns (B, E) that are not the row's own."""

    unk: torch.Tensor
    ext: torch.Tensor

    @classmethod
    def of(cls, rows: Sequence[RowSpec], special: SpecialIds, num_columns: int, device, repeat: int = 1) -> "_Blocked":
        unk = torch.tensor([special.unk not in row.ext_columns for row in rows], dtype=torch.bool)
        ext = torch.tensor([[col not in row.ext_columns for col in range(special.vocab_size, num_columns)]
                            for row in rows], dtype=torch.bool).view(len(rows), num_columns - special.vocab_size)
        return cls(unk.repeat_interleave(repeat).to(device), ext.repeat_interleave(repeat, dim=0).to(device))


def _process_logits(logits: torch.Tensor, blocked: _Blocked, fed: torch.Tensor, penalty: float,
                    special: SpecialIds) -> torch.Tensor:
    """Steps 1-2 above, in float32: column mask, then the repetition penalty on the distinct ids fed so far
    (`fed` (B, t) base ids). Works in place on `logits` (a fresh tensor per step) and touches only the masked
    and the fed columns, not the whole vocabulary: the same numbers as masking and penalising every column."""
    logits = logits.float()
    vocab = special.vocab_size
    logits[:, special.unk] = logits[:, special.unk].masked_fill(blocked.unk, MASKED_LOGIT)
    if blocked.ext.shape[1]:
        logits[:, vocab:] = logits[:, vocab:].masked_fill(blocked.ext, MASKED_LOGIT)
    if penalty != 1.0:
        ids = fed.clamp(max=vocab - 1)
        head = logits.gather(1, ids)  # all read before any write: an id fed twice is penalised once
        logits.scatter_(1, ids, torch.where(head < 0, head * penalty, head / penalty))
    return logits


def _base_token(columns: torch.Tensor, inputs: BeeInputs, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit columns -> (id, sub) to feed back: ext columns map to their base id and sub index."""
    ext = columns >= vocab_size
    if inputs.ext_table_ids.numel() == 0:
        return columns, torch.zeros_like(columns)
    j = (columns - vocab_size).clamp(min=0, max=inputs.ext_table_ids.numel() - 1)
    ext_ids = inputs.ext_table_ids.to(columns.device).long()
    ext_subs = inputs.ext_table_sub.to(columns.device).long()
    return torch.where(ext, ext_ids[j], columns), torch.where(ext, ext_subs[j], torch.zeros_like(columns))


# ---- entry point --------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: CPMBee,
    inputs: BeeInputs,
    rows: Sequence[RowSpec],
    config: GenerationConfig,
    special: SpecialIds,
    hidden_states: torch.Tensor | None = None,
) -> list[Generated]:
    """Decode an answer for every row of `inputs` (prompts whose answer slot was removed; see inputs.py)."""
    if len(rows) != inputs.batch_size:
        raise ValueError(f"{len(rows)} row specs for a batch of {inputs.batch_size}")
    device = model.embedding.device
    inputs = inputs.to(device)
    if config.strategy == "beam":
        return _beam_search(model, inputs, rows, config, special, hidden_states)
    return _sample_or_greedy(model, inputs, rows, config, special, hidden_states)


# ---- beam search --------------------------------------------------------------------------------------
class _Hypotheses:
    """The n best finished hypotheses of every prompt, on the device, with the original's bookkeeping.

    The original keeps a Python list per prompt: append while fewer than n, else (if better than the worst)
    append and delete the lowest score - the earliest in the list among equal ones; `best` is the first
    maximum. List order is insertion order, so a slot table with an insertion stamp keeps the same choices."""

    def __init__(self, batch: int, size: int, max_tokens: int, length_penalty: float, device) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.score = torch.zeros(batch, size, dtype=torch.float64, device=device)  # float64: the original's Python floats
        self.tokens = torch.zeros(batch, size, max_tokens, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.stamp = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.arange(size, device=device)
        self.added = 0

    def _filled(self) -> torch.Tensor:
        return self.slots[None, :] < self.count[:, None]

    def worst(self) -> torch.Tensor:
        """(B,) the lowest score held (1e9 while empty, as the original starts)."""
        return torch.where(self._filled(), self.score, math.inf).amin(dim=1).clamp(max=1e9)

    def is_done(self, best_sum_logprobs: torch.Tensor, step: int) -> torch.Tensor:
        if step == 0:  # nothing can be held yet (and 0 ** lp would divide by zero)
            return torch.zeros_like(self.count, dtype=torch.bool)
        bound = best_sum_logprobs.double() / step**self.length_penalty
        return (self.count == self.size) & (self.worst() >= bound)

    def add(self, accept_mask: torch.Tensor, tokens: torch.Tensor, length: int, sum_logprobs: torch.Tensor,
            finished: torch.Tensor) -> None:
        """Offer one hypothesis per prompt where `accept_mask` (B,); tokens (B, max_tokens) of `length` tokens."""
        score = sum_logprobs.double() / length**self.length_penalty
        full = self.count == self.size
        accept = accept_mask & (~full | (score > self.worst()))
        # full: replace the lowest score, the oldest among equal ones; else the next free slot
        lowest = self.score == self.score.amin(dim=1, keepdim=True)
        oldest = torch.where(lowest, self.stamp, torch.iinfo(torch.long).max).argmin(dim=1)
        slot = torch.where(full, oldest, self.count.clamp(max=self.size - 1))
        here = accept[:, None] & (self.slots[None, :] == slot[:, None])  # (B, size)
        self.score = torch.where(here, score[:, None], self.score)
        self.tokens = torch.where(here[..., None], tokens[:, None, :], self.tokens)
        self.length = torch.where(here, length, self.length)
        self.finished = torch.where(here, finished[:, None], self.finished)
        self.stamp = torch.where(here, self.added, self.stamp)
        self.count = self.count + (accept & ~full).long()
        self.added += 1

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per prompt: (score, tokens, length, finished) of the first best hypothesis."""
        top = torch.where(self._filled(), self.score, -math.inf)
        first = torch.where(top == top.amax(dim=1, keepdim=True), self.stamp, torch.iinfo(torch.long).max).argmin(dim=1)
        pick = lambda x: x[torch.arange(x.shape[0], device=x.device), first]  # noqa: E731
        return pick(self.score), pick(self.tokens), pick(self.length), pick(self.finished)


def _beam_search(model, inputs, rows, config, special, hidden_states) -> list[Generated]:
    batch, beams, device = inputs.batch_size, config.beam_size, model.embedding.device
    n = batch * beams
    segments = torch.tensor([r.answer_segment for r in rows], device=device)
    # each prompt is prefilled once; its beams share its cache slots
    model.start_decoding(inputs, segments, beams, config.max_new_tokens, hidden_states)
    num_columns = special.vocab_size + inputs.ext_table_ids.numel()
    blocked = _Blocked.of(rows, special, num_columns, device, repeat=beams)
    fed = torch.full((n, config.max_new_tokens), special.bos, dtype=torch.long, device=device)  # base ids fed so far
    beam_scores = torch.full((batch, beams), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, 0] = 0

    feed_ids = torch.full((n,), special.bos, dtype=torch.long, device=device)
    feed_subs = torch.zeros(n, dtype=torch.long, device=device)
    answers = torch.zeros(n, config.max_new_tokens, dtype=torch.long, device=device)  # columns of each live beam
    hyps = _Hypotheses(batch, beams, config.max_new_tokens, config.length_penalty, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    last_step = config.max_new_tokens - 1
    first_beam = torch.arange(batch, device=device)[:, None] * beams  # (B, 1) row of each prompt's beam 0
    step_index = torch.zeros(1, dtype=torch.long, device=device)

    for step in range(config.max_new_tokens):
        logits = model.decode_next(feed_ids, feed_subs, step_index)
        logits = _process_logits(logits, blocked, fed[:, : step + 1], config.repetition_penalty, special)
        scores = F.log_softmax(logits / config.temperature, dim=-1) + beam_scores.view(-1, 1)
        top_scores, top_index = scores.view(batch, -1).topk(2 * beams, dim=1)  # sorted: best first
        source = first_beam + torch.div(top_index, num_columns, rounding_mode="floor")  # (B, 2k) rows
        column = top_index % num_columns

        done |= hyps.is_done(top_scores[:, 0], step)
        ends = (column == special.eos) | (step == last_step)
        # candidates are taken in order until `beams` continue: a candidate counts if fewer continued before it
        continuing_before = (~ends).long().cumsum(dim=1) - (~ends).long()
        taken = ~done[:, None] & (continuing_before < beams)
        ending = taken & ends
        for c in range(2 * beams):  # in candidate order, as the original adds them
            candidate_tokens = answers[source[:, c]].clone()
            candidate_tokens[:, step] = column[:, c]
            hyps.add(ending[:, c], candidate_tokens, step + 1, top_scores[:, c], column[:, c] == special.eos)
        if step == last_step or (step % _DONE_CHECK_EVERY == 0 and bool(done.all())):  # the one host read
            break

        # each live prompt keeps exactly `beams` continuing candidates (at most `beams` of 2*beams end in eos)
        continuing = taken & ~ends
        order = torch.sort((~continuing).to(torch.uint8), dim=1, stable=True).indices[:, :beams]
        new_source = torch.where(done[:, None], first_beam, source.gather(1, order))
        beam_scores = torch.where(done[:, None], 0.0, top_scores.gather(1, order))
        new_columns = torch.where(done[:, None], special.bos, column.gather(1, order))  # done: feed something harmless
        index = new_source.view(n)
        model.reorder_rows(new_source - first_beam, written=step + 1)
        answers = answers.index_select(0, index)
        answers[:, step] = new_columns.view(n)
        feed_ids, feed_subs = _base_token(new_columns.view(n), inputs, special.vocab_size)
        fed = fed.index_select(0, index)
        fed[:, step + 1] = feed_ids
        step_index += 1

    score, tokens, length, finished = (x.cpu() for x in hyps.best())
    model.end_decoding()
    results = []
    for b in range(batch):
        answer = tokens[b, : length[b]].tolist()
        if answer and answer[-1] == special.eos:
            answer = answer[:-1]
        results.append(Generated(token_ids=answer, finished=bool(finished[b]), score=float(score[b])))
    return results


# ---- greedy and top-p sampling ------------------------------------------------------------------------
def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of columns whose probability mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this column already enough
    sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _sample_or_greedy(model, inputs, rows, config, special, hidden_states) -> list[Generated]:
    batch, device = inputs.batch_size, model.embedding.device
    segments = torch.tensor([r.answer_segment for r in rows], device=device)
    model.start_decoding(inputs, segments, 1, config.max_new_tokens, hidden_states)
    num_columns = special.vocab_size + inputs.ext_table_ids.numel()
    blocked = _Blocked.of(rows, special, num_columns, device)
    fed = torch.full((batch, config.max_new_tokens), special.bos, dtype=torch.long, device=device)
    generators = None
    if config.strategy == "sample":
        # one generator per row: a row's sample depends on its own seed only, never on its batch neighbours
        generators = []
        for r, row in enumerate(rows):
            g = torch.Generator(device=device)
            g.manual_seed(config.seed + r if row.seed is None else row.seed)
            generators.append(g)

    feed_ids = torch.full((batch,), special.bos, dtype=torch.long, device=device)
    feed_subs = torch.zeros(batch, dtype=torch.long, device=device)
    tokens = torch.zeros(batch, config.max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    logprob = torch.zeros(batch, dtype=torch.float32, device=device)
    step_index = torch.zeros(1, dtype=torch.long, device=device)
    # finished rows only ever add eos and nothing to their score, so looking less often changes no result
    check_every = _FINISHED_CHECK_EVERY_GPU if device.type == "cuda" else 1

    for step in range(config.max_new_tokens):
        logits = model.decode_next(feed_ids, feed_subs, step_index)
        logits = _process_logits(logits, blocked, fed[:, : step + 1], config.repetition_penalty, special)
        logits = logits / config.temperature
        logp = F.log_softmax(logits, dim=-1)
        if generators is None:
            chosen = logits.argmax(dim=-1)
        else:
            probs = _top_p_filter(logits, config.top_p).softmax(dim=-1)
            chosen = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])
        live = ~finished
        tokens[:, step] = torch.where(live, chosen, torch.full_like(chosen, special.eos))
        logprob += torch.where(live, logp.gather(1, chosen[:, None])[:, 0], torch.zeros_like(logprob))
        ended = live & (chosen == special.eos)
        lengths = torch.where(ended, torch.full_like(lengths, step), lengths)
        finished |= ended
        if (step + 1) % check_every == 0 and bool(finished.all()):  # a host read every `check_every` steps
            break
        feed_ids, feed_subs = _base_token(chosen, inputs, special.vocab_size)
        if step + 1 < config.max_new_tokens:
            fed[:, step + 1] = feed_ids
        step_index += 1

    tokens, lengths, finished, logprob = tokens.cpu(), lengths.cpu(), finished.cpu(), logprob.cpu()
    model.end_decoding()
    return [
        Generated(token_ids=tokens[r, : lengths[r]].tolist(), finished=bool(finished[r]), score=float(logprob[r]))
        for r in range(batch)
    ]

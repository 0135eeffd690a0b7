"""Decoding for CPM-Bee: the original VisCPM beam search (exactly), greedy, and top-p sampling.

All strategies run a batch of prompts at once on the model's static KV cache; every row's result is the
same as running it alone. Per step there is one host transfer (the beam candidates, or the "all finished"
flag), nothing per token per row.

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
def _blocked_columns(rows: Sequence[RowSpec], special: SpecialIds, num_columns: int, device) -> torch.Tensor:
    """(B, V+E) bool: columns set to MASKED_LOGIT for each row."""
    blocked = torch.zeros(len(rows), num_columns, dtype=torch.bool)
    for r, row in enumerate(rows):
        if special.unk not in row.ext_columns:
            blocked[r, special.unk] = True
        for col in range(special.vocab_size, num_columns):
            if col not in row.ext_columns:
                blocked[r, col] = True
    return blocked.to(device)


def _process_logits(logits: torch.Tensor, blocked: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Steps 1-2 above, in float32: column mask, then the repetition penalty on the seen vocab columns."""
    logits = logits.float().masked_fill(blocked, MASKED_LOGIT)
    vocab = seen.shape[1]
    if penalty != 1.0:
        head = logits[:, :vocab]
        penalised = torch.where(head < 0, head * penalty, head / penalty)
        logits = torch.cat([torch.where(seen, penalised, head), logits[:, vocab:]], dim=1)
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


def _expand_rows(inputs: BeeInputs, times: int) -> BeeInputs:
    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(times, dim=0)

    return BeeInputs(**{f: (v if f.startswith("ext_table") else rep(v)) for f, v in vars(inputs).items()})


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
    """The n best finished hypotheses of one row, with the original's bookkeeping (incl. tie handling)."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, list[int], bool]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, finished: bool) -> None:
        score = sum_logprobs / len(tokens) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens, finished))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, step: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.worst >= best_sum_logprobs / step**self.length_penalty

    def best(self) -> tuple[float, list[int], bool]:
        return max(self.items, key=lambda item: item[0])


def _beam_search(model, inputs, rows, config, special, hidden_states) -> list[Generated]:
    batch, beams, device = inputs.batch_size, config.beam_size, model.embedding.device
    n = batch * beams
    prompt_len = inputs.seq_len
    model.setup_kv_cache(n, prompt_len + config.max_new_tokens)
    model.prefill(_expand_rows(inputs, beams),
                  None if hidden_states is None else hidden_states.repeat_interleave(beams, dim=0))
    num_columns = special.vocab_size + inputs.ext_table_ids.numel()
    blocked = _blocked_columns(rows, special, num_columns, device).repeat_interleave(beams, dim=0)
    seen = torch.zeros(n, special.vocab_size, dtype=torch.bool, device=device)
    beam_scores = torch.full((batch, beams), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, 0] = 0

    feed_ids = torch.full((n,), special.bos, dtype=torch.long, device=device)
    feed_subs = torch.zeros(n, dtype=torch.long, device=device)
    positions = torch.zeros(n, dtype=torch.long, device=device)
    segments = torch.tensor([r.answer_segment for r in rows], device=device).repeat_interleave(beams)
    answers: list[list[int]] = [[] for _ in range(n)]  # tokens of each live beam
    hyps = [_Hypotheses(beams, config.length_penalty) for _ in range(batch)]
    done = [False] * batch
    last_step = config.max_new_tokens - 1

    for step in range(config.max_new_tokens):
        logits, _ = model.decode_step(feed_ids, feed_subs, positions, segments, slot=prompt_len + step)
        seen[torch.arange(n, device=device), feed_ids.clamp(max=special.vocab_size - 1)] = True
        logits = _process_logits(logits, blocked, seen, config.repetition_penalty) / config.temperature
        scores = F.log_softmax(logits, dim=-1) + beam_scores.view(-1, 1)
        top_scores, top_index = scores.view(batch, -1).topk(2 * beams, dim=1)
        top_scores, top_index = top_scores.cpu().tolist(), top_index.cpu().tolist()  # the one sync per step

        reorder, new_scores, new_columns, new_answers = [], [], [], []
        for b in range(batch):
            done[b] = done[b] or hyps[b].is_done(max(top_scores[b]), step)
            kept: list[tuple[int, float, int]] = []  # (source beam row, score, column)
            if not done[b]:
                for index, value in zip(top_index[b], top_scores[b]):
                    beam, column = divmod(index, num_columns)
                    source = b * beams + beam
                    if column == special.eos or step == last_step:
                        hyps[b].add(answers[source] + [column], value, finished=column == special.eos)
                    else:
                        kept.append((source, value, column))
                    if len(kept) == beams:
                        break
            if step == last_step:
                continue
            if done[b]:  # keep feeding something harmless; the row's results are final
                kept = [(b * beams, 0.0, special.bos)] * beams
            for source, value, column in kept:
                reorder.append(source)
                new_scores.append(value)
                new_columns.append(column)
                new_answers.append(answers[source] + [column])
        if step == last_step or all(done):
            break

        index = torch.tensor(reorder, device=device)
        if reorder != list(range(n)):  # beams only ever take over beams of their own prompt: move the answer slots
            model.reorder_kv_cache(index, start=prompt_len, end=prompt_len + step + 1)
        seen = seen.index_select(0, index)
        beam_scores = torch.tensor(new_scores, dtype=torch.float32, device=device).view(batch, beams)
        columns = torch.tensor(new_columns, device=device)
        feed_ids, feed_subs = _base_token(columns, inputs, special.vocab_size)
        positions = positions.index_select(0, index) + 1
        answers = new_answers

    results = []
    for b in range(batch):
        score, tokens, finished = hyps[b].best()
        if tokens and tokens[-1] == special.eos:
            tokens = tokens[:-1]
        results.append(Generated(token_ids=tokens, finished=finished, score=score))
    model.clear_kv_cache()
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
    prompt_len = inputs.seq_len
    model.setup_kv_cache(batch, prompt_len + config.max_new_tokens)
    model.prefill(inputs, hidden_states)
    num_columns = special.vocab_size + inputs.ext_table_ids.numel()
    blocked = _blocked_columns(rows, special, num_columns, device)
    seen = torch.zeros(batch, special.vocab_size, dtype=torch.bool, device=device)
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
    segments = torch.tensor([r.answer_segment for r in rows], device=device)
    tokens = torch.zeros(batch, config.max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    logprob = torch.zeros(batch, dtype=torch.float32, device=device)

    for step in range(config.max_new_tokens):
        logits, _ = model.decode_step(feed_ids, feed_subs, torch.full((batch,), step, device=device), segments,
                                      slot=prompt_len + step)
        seen[torch.arange(batch, device=device), feed_ids.clamp(max=special.vocab_size - 1)] = True
        logits = _process_logits(logits, blocked, seen, config.repetition_penalty) / config.temperature
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
        if bool(finished.all()):  # the one sync per step: stop as soon as every row has ended
            break
        feed_ids, feed_subs = _base_token(chosen, inputs, special.vocab_size)

    tokens, lengths, finished, logprob = tokens.cpu(), lengths.cpu(), finished.cpu(), logprob.cpu()
    model.clear_kv_cache()
    return [
        Generated(token_ids=tokens[r, : lengths[r]].tolist(), finished=bool(finished[r]), score=float(logprob[r]))
        for r in range(batch)
    ]

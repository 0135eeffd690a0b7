"""CPM-Bee, the 10B bilingual LLM under VisCPM, in one readable file.

Numerics follow the original implementation (OpenBMB/VisCPM `VisCPM/models/cpmbee.py` and `modules/`):

* embedding: ``E[id] / sqrt(d)`` followed by a rotary rotation whose angle comes from the token's *sub* index
  (ext tokens: the 2nd, 3rd, ... distinct unknown string share the `<unk>` row but are rotated apart);
* bias-free linears that divide by ``sqrt(dim_in)`` (after the matmul, except FFN-out: before it);
* RMSNorm with the variance in float32; residuals scaled by ``1 / 1.05``; gated-GELU FFN;
* attention bias from a bucket table: relative position buckets inside a segment, segment-relation buckets
  across segments (how far up/down the input tree two segments are);
* logits tied to the embedding, plus one extra column per ext token ``(id, sub > 0)`` of the batch.

Inference uses a preallocated KV cache with preallocated per-position metadata (position, segment, sample,
context, validity): ``setup_kv_cache`` -> ``prefill`` -> ``decode_step`` ... Nothing grows per step, rows of a
batch may have different lengths, and attention runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CPMBeeConfig
from .inputs import BeeInputs

RESIDUAL_SCALE = 1.05  # the original divides every residual sum by 1.05


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same numbers without two no-op conversions (ops count per decode step)
            return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class ScaledLinear(nn.Module):
    """Bias-free linear divided by sqrt(dim_in), after the matmul or (``scale_before``) before it."""

    def __init__(self, dim_in: int, dim_out: int, scale_before: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        self.norm = math.sqrt(dim_in)
        self.scale_before = scale_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_before:
            return F.linear(x / self.norm, self.weight)
        return F.linear(x, self.weight) / self.norm


class Attention(nn.Module):
    def __init__(self, config: CPMBeeConfig) -> None:
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        self.q = ScaledLinear(config.dim_model, config.dim_attn)
        self.k = ScaledLinear(config.dim_model, config.dim_attn)
        self.v = ScaledLinear(config.dim_model, config.dim_attn)
        self.out = ScaledLinear(config.dim_attn, config.dim_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.dim_head).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # (B, Lq, d)
        bias: torch.Tensor,  # (B, H, Lq, Lk) additive: position bias, -inf where masked
        row_visible: torch.Tensor | None,  # (B, 1, Lq, 1): 0 where a query sees no key at all; None: all see some
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, H, T, dh) buffers
        cache_index: torch.Tensor | None = None,  # (Lq,) slots to write the new keys/values to
        attend_cache: bool = False,  # attend over the whole cache (decode) or only the new keys (prefill)
    ) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            if k.dtype != k_cache.dtype:
                k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
            k_cache.index_copy_(2, cache_index, k)
            v_cache.index_copy_(2, cache_index, v)
            if attend_cache:
                k, v = k_cache, v_cache
        # scale = 1/sqrt(dim_head) is SDPA's default, as in the original
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # the original zeroes the probabilities of masked keys, so a query with no visible key outputs 0
        if row_visible is not None:
            out = out * row_visible
        b, _, n, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, self.num_heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, config: CPMBeeConfig) -> None:
        super().__init__()
        self.w_gate = ScaledLinear(config.dim_model, config.dim_ff)
        self.w_up = ScaledLinear(config.dim_model, config.dim_ff)
        self.w_down = ScaledLinear(config.dim_ff, config.dim_model, scale_before=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.gelu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: CPMBeeConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim_model, config.eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim_model, config.eps)
        self.ffn = FeedForward(config)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, row_visible: torch.Tensor | None, **cache_args) -> torch.Tensor:
        h = (h + self.attn(self.attn_norm(h), bias, row_visible, **cache_args)) / RESIDUAL_SCALE
        return (h + self.ffn(self.ffn_norm(h))) / RESIDUAL_SCALE


def position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style bucket of ``key_pos - query_pos``: half the buckets per direction, exact up to
    a quarter of num_buckets, log-spaced up to max_distance."""
    half = num_buckets // 2
    bucket = (relative_position > 0).to(torch.int32) * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp keeps log() finite for distance 0; those entries take the exact branch anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).to(torch.int32)).clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance.to(torch.int32), large)


@dataclass
class _Tokens:
    """Per-token attention metadata of one side (queries or keys) of an attention call; all (B, L)."""

    position: torch.Tensor
    segment: torch.Tensor
    sample: torch.Tensor
    context: torch.Tensor  # bool
    valid: torch.Tensor  # bool


class CPMBee(nn.Module):
    def __init__(self, config: CPMBeeConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim_model
        self.embedding = nn.Parameter(torch.empty(config.vocab_size, d))
        self.position_bias = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets, config.num_heads)
        )
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(d, config.eps)
        # rotary frequencies of the ext-token sub embedding; fp32 regardless of the weights' dtype
        self._cache: _KVCache | None = None
        self._ext: torch.Tensor | None = None
        # the static decoding state (GroupedKVCache) and the decode step, compiled or not (compile_decode)
        self._grouped: GroupedKVCache | None = None
        self._decode_fn = self._decode_grouped
        self.compiled = False

    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> "CPMBee":
        """Deterministic random weights (tests, demo, the `tiny` preset): norms 1 + 0.1 N(0,1), everything else
        N(0,1) - unit variance is what the original's sqrt(dim_in)-scaled linears expect."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else noise)
        return self

    # ---- embedding and output -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, subs: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., d): E[id] / sqrt(d), rotated by the angle ``sub * 16 * inv_freq``."""
        x = F.embedding(ids.long(), self.embedding) / math.sqrt(self.config.dim_model)
        # rotary frequencies in fp32 whatever the weights' dtype (cheap: dim_model / 2 values)
        d = self.config.dim_model
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
        angle = (subs.to(torch.float32) * self.config.ext_rotary_distance_scale)[..., None] * inv_freq
        angle = torch.cat((angle, angle), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * angle.cos() + rotated * angle.sin()).to(x.dtype)

    def logits(self, hidden: torch.Tensor, ext_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """(..., vocab_size + E): tied projection; ext columns use the (scaled, rotated) ext embeddings and,
        as in the original, the hidden state is not divided by sqrt(d) for them."""
        out = F.linear(hidden / math.sqrt(self.config.dim_model), self.embedding)
        if ext_embedding is not None and ext_embedding.shape[0] > 0:
            out = torch.cat((out, F.linear(hidden, ext_embedding)), dim=-1)
        return out

    def ext_embedding(self, ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor) -> torch.Tensor:
        return self.embed(ext_table_ids, ext_table_sub)

    # ---- attention bias --------------------------------------------------------------------------------
    def _attention_bias(
        self,
        q: _Tokens,
        k: _Tokens,
        q_num_segments: torch.Tensor,  # (B, Lq)
        q_rel_offset: torch.Tensor,  # (B, Lq)
        segment_rel: torch.Tensor,  # (B, R)
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive bias (B, H, Lq, Lk) with -inf on masked pairs, and (B, 1, Lq, 1) row visibility."""
        cfg = self.config
        batch, len_q, len_k = q.position.shape[0], q.position.shape[1], k.position.shape[1]
        same_sample = q.sample[:, :, None] == k.sample[:, None, :]
        # segment-relation bucket: entry (q_seg, k_seg) of the query's sample table
        rel_index = q.segment[:, :, None] * q_num_segments[:, :, None] + k.segment[:, None, :] + q_rel_offset[:, :, None]
        rel_index = rel_index.masked_fill(~same_sample, 0).long()
        seg_bucket = torch.gather(segment_rel.long(), 1, rel_index.view(batch, -1)).view(batch, len_q, len_k)
        seg_bucket = seg_bucket.masked_fill(~same_sample, 1)  # bucket 1: another (in-context) sample
        inner = position_bucket(
            k.position[:, None, :].long() - q.position[:, :, None].long(),
            cfg.position_bias_num_buckets,
            cfg.position_bias_max_distance,
        )
        bucket = torch.where(seg_bucket == 0, inner.long(), seg_bucket + cfg.position_bias_num_buckets - 1)
        bias = F.embedding(bucket, self.position_bias).permute(0, 3, 1, 2).to(dtype)  # (B, H, Lq, Lk)

        causal = k.position[:, None, :] <= q.position[:, :, None]
        mask = k.context[:, None, :] | (~q.context[:, :, None] & causal)
        mask &= (q.sample[:, :, None] == 0) | same_sample
        mask &= q.valid[:, :, None] & k.valid[:, None, :]
        row_visible = mask.any(dim=-1)  # (B, Lq)
        # rows that see nothing get an all-open mask (no NaN from softmax) and are zeroed after attention
        mask |= ~row_visible[:, :, None]
        bias = bias.masked_fill(~mask[:, None], float("-inf"))
        return bias, row_visible[:, None, :, None].to(dtype)

    # ---- full forward (no cache) -----------------------------------------------------------------------
    def forward(
        self, inputs: BeeInputs, hidden_states: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Whole-sequence forward. Returns (logits (B, L, V+E) or None, hidden states (B, L, d) after the final
        norm). ``hidden_states`` replaces the token embedding (e.g. with image features spliced in)."""
        h, bias, row_visible, _ = self._prepare(inputs, hidden_states)
        for layer in self.layers:
            h = layer(h, bias, row_visible)
        h = self.final_norm(h)
        logits = self.logits(h, self.ext_embedding(inputs.ext_table_ids, inputs.ext_table_sub)) if return_logits else None
        return logits, h

    def _prepare(self, inputs: BeeInputs, hidden_states: torch.Tensor | None):
        length = inputs.length.to(inputs.input_ids.device)
        valid = torch.arange(inputs.seq_len, device=length.device)[None, :] < length[:, None]
        tokens = _Tokens(inputs.position, inputs.segment_ids, inputs.sample_ids, inputs.context.bool(), valid)
        h = self.embed(inputs.input_ids, inputs.input_id_subs) if hidden_states is None else hidden_states
        h = h.to(self.embedding.dtype)
        bias, row_visible = self._attention_bias(
            tokens, tokens, inputs.num_segments, inputs.segment_rel_offset, inputs.segment_rel, h.dtype
        )
        return h, bias, row_visible, tokens

    # ---- KV cache --------------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate keys/values and per-slot metadata for ``batch_size`` rows of up to ``max_length`` tokens."""
        device = self.embedding.device
        dtype = dtype or self.embedding.dtype
        self._cache = _KVCache.allocate(self.config, batch_size, max_length, device, dtype)

    def clear_kv_cache(self) -> None:
        self._cache = None

    @property
    def kv_cache(self) -> "_KVCache":
        if self._cache is None:
            raise RuntimeError("call setup_kv_cache(batch_size, max_length) first")
        return self._cache

    @torch.no_grad()
    def prefill(
        self, inputs: BeeInputs, hidden_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt through the model and fill cache slots [0, L). Returns (logits at each row's last
        valid token (B, V+E), hidden states (B, L, d))."""
        cache = self.kv_cache
        if inputs.batch_size != cache.batch_size or inputs.seq_len > cache.max_length:
            raise ValueError(
                f"inputs of shape {tuple(inputs.input_ids.shape)} do not fit the KV cache "
                f"(batch {cache.batch_size}, max_length {cache.max_length})"
            )
        h, bias, row_visible, tokens = self._prepare(inputs, hidden_states)
        cache.reset()
        slots = torch.arange(inputs.seq_len, device=h.device)
        cache.store_prompt(tokens, inputs)
        self._ext = self.ext_embedding(inputs.ext_table_ids, inputs.ext_table_sub)
        for layer, kv in zip(self.layers, cache.layers()):
            h = layer(h, bias, row_visible, kv_cache=kv, cache_index=slots)
        h = self.final_norm(h)
        last = (inputs.length.long() - 1).clamp(min=0).to(h.device)
        last_hidden = h[torch.arange(h.shape[0], device=h.device), last]
        return self.logits(last_hidden, self._ext), h

    @torch.no_grad()
    def decode_step(
        self,
        token_ids: torch.Tensor,  # (B,) ids to feed
        token_subs: torch.Tensor,  # (B,) their sub index (0 for vocab ids)
        positions: torch.Tensor,  # (B,) position inside their segment
        segments: torch.Tensor,  # (B,) segment id (the answer segment)
        slot: int | torch.Tensor,  # cache slot to write; the same for every row
        hidden_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (context 1, main sample, as the original's decoding does). Returns
        (logits (B, V+E), hidden (B, d))."""
        cache = self.kv_cache
        device = self.embedding.device
        slot_index = torch.as_tensor(slot, device=device).reshape(1).long()
        b = token_ids.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)
        q = _Tokens(
            position=positions.view(b, 1).to(device),
            segment=segments.view(b, 1).to(device),
            sample=torch.zeros(b, 1, dtype=torch.int32, device=device),
            context=ones,
            valid=ones,
        )
        cache.store_token(q, slot_index)
        k = cache.key_tokens()
        h = self.embed(token_ids.view(b, 1).to(device), token_subs.view(b, 1).to(device)) if hidden_states is None else hidden_states
        h = h.to(self.embedding.dtype)
        bias, row_visible = self._attention_bias(
            q, k, cache.num_segments[:, None], cache.rel_offset[:, None], cache.segment_rel, h.dtype
        )
        for layer, kv in zip(self.layers, cache.layers()):
            h = layer(h, bias, row_visible, kv_cache=kv, cache_index=slot_index, attend_cache=True)
        h = self.final_norm(h)[:, 0]
        return self.logits(h, self._ext), h

    @torch.no_grad()
    def reorder_kv_cache(self, index: torch.Tensor, start: int = 0, end: int | None = None) -> None:
        """Row i of the cache becomes old row index[i] (beam search), for slots [start, end) only: beams of one
        prompt share the prompt's slots, so beam search moves just the generated ones."""
        self.kv_cache.reorder(index, start, end)

    # ---- static decoding: one prompt cache shared by a group of rows (beams), a static-shape step --------------
    # generation.py decodes through these four methods. Unlike setup_kv_cache/prefill/decode_step above (any
    # positions, any segments), every row feeds its answer segment at position `step`, which lets the whole
    # attention bias be computed once, before the first step.
    @torch.no_grad()
    def start_decoding(
        self,
        inputs: BeeInputs,  # P prompts
        answer_segments: torch.Tensor,  # (P,) segment id of each prompt's answer
        group: int,  # rows per prompt (beam size; 1 for greedy and sampling)
        max_new_tokens: int,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefill each prompt once into a :class:`GroupedKVCache` for ``P * group`` decoding rows; returns the
        logits at each prompt's last valid token (P, V+E)."""
        p, n = inputs.batch_size, inputs.seq_len
        cache = self._grouped_cache(p, group, n, max_new_tokens)
        h, bias, row_visible, tokens = self._prepare(inputs, hidden_states)
        slots = torch.arange(n, device=h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, bias, row_visible, kv_cache=(cache.keys[i], cache.values[i]), cache_index=slots)
        h = self.final_norm(h)
        last = (inputs.length.long() - 1).clamp(min=0).to(h.device)
        ext = self.ext_embedding(inputs.ext_table_ids, inputs.ext_table_sub)
        cache.ext = ext.to(h.dtype)
        cache.set_bias(self, tokens, inputs, answer_segments.to(h.device))
        return self.logits(h[torch.arange(p, device=h.device), last], ext)

    def _grouped_cache(self, prompts: int, group: int, prompt_len: int, new_tokens: int) -> "GroupedKVCache":
        shape = GroupedKVCache.shape_for(self.config, prompts, group, prompt_len, new_tokens)
        cache = self._grouped
        dtype, device = self.embedding.dtype, self.embedding.device
        layout = (prompts, group, _round_up(prompt_len, 8), _round_up(new_tokens, 8))  # equal shapes can differ here
        if (cache is None or cache.layout != layout or cache.keys.shape != shape or cache.keys.dtype != dtype
                or cache.keys.device != device):
            self._grouped = None  # free the old buffers before allocating the new ones
            cache = self._grouped = GroupedKVCache(self.config, prompts, group, prompt_len, new_tokens, device, dtype)
        else:
            cache.reset()  # same shapes: keep the buffers (a captured CUDA graph reads their addresses)
        return cache

    @torch.no_grad()
    def decode_next(self, token_ids: torch.Tensor, token_subs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One decode step for all ``P * group`` rows (row r is prompt r // group): feed (id, sub) at answer
        position ``step`` (a (1,) long tensor on the device, so a captured graph replays for every step).
        Returns logits (P * group, V+E)."""
        if self._grouped is None:
            raise RuntimeError("call start_decoding first")
        logits = self._decode_fn(token_ids, token_subs, step)
        # a CUDA graph overwrites its outputs at the next replay
        return logits.clone() if self.compiled else logits

    def _decode_grouped(self, token_ids: torch.Tensor, token_subs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The static-shape step: same shapes and the same buffers at every step, no host value inside."""
        cache = self._grouped
        p, g = cache.prompts, cache.group
        h = self.embed(token_ids.view(p, g), token_subs.view(p, g)).to(self.embedding.dtype)  # the rows are the queries
        bias = cache.step_bias(step)
        slots = cache.answer_base + step
        for i, layer in enumerate(self.layers):
            h = layer(h, bias, None, kv_cache=(cache.keys[i], cache.values[i]), cache_index=slots, attend_cache=True)
        return self.logits(self.final_norm(h).view(p * g, -1), cache.ext)

    @torch.no_grad()
    def reorder_rows(self, source: torch.Tensor, written: int) -> None:
        """Beam search: row j of each prompt takes over the answer so far of that prompt's row ``source[p, j]``
        (P, group); only the first ``written`` answer slots are copied, the prompt slots are shared."""
        self._grouped.reorder(source, written)

    def end_decoding(self) -> None:
        """Free the decoding buffers, unless a compiled step will reuse them (their addresses are in the graph)."""
        if not self.compiled:
            self._grouped = None

    def compile_decode(self, **options) -> None:
        """Compile the decode step with torch.compile; defaults: one CUDA graph per shape (mode reduce-overhead),
        no graph break allowed. Decoding stays exactly as eager (the same ops, fused)."""
        # dynamic=False: one specialised graph per batch shape (what a CUDA graph captures anyway)
        options = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False, **options}
        self._decode_fn = torch.compile(self._decode_grouped, **options)
        self.compiled = True


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GroupedKVCache(nn.Module):
    """Static decoding state of P prompts x ``group`` rows (beams) each, all buffers (persistent=False).

    Slot axis of each prompt: [prompt (Lp) | row 0's answer (G) | row 1's answer (G) | ...]. The rows of a prompt
    are the query axis of one attention call, so a prompt's keys/values are computed, stored and read once for all
    its beams; each row's bias hides the other rows' answer slots. Lp and G are multiples of 8 (SDPA would pad
    the mask in every layer otherwise). The bias of every step is computed once: every row feeds its answer
    segment at position ``step``, so only that step's row of the tables is read."""

    def __init__(self, config: CPMBeeConfig, prompts: int, group: int, prompt_len: int, new_tokens: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.prompts, self.group = prompts, group
        self.prompt_slots, self.answer_slots = _round_up(prompt_len, 8), _round_up(new_tokens, 8)
        self.layout = (prompts, group, self.prompt_slots, self.answer_slots)
        shape = self.shape_for(config, prompts, group, prompt_len, new_tokens)
        buffer = lambda name, value: self.register_buffer(name, value, persistent=False)  # noqa: E731
        buffer("keys", torch.zeros(shape, device=device, dtype=dtype))  # (layers, P, H, slots, dh)
        buffer("values", torch.zeros(shape, device=device, dtype=dtype))
        buffer("answer_base", self.prompt_slots + self.answer_slots * torch.arange(group, device=device))
        h, lp, g = config.num_heads, self.prompt_slots, self.answer_slots
        buffer("prompt_bias", torch.zeros(prompts, h, g, lp, device=device, dtype=dtype))  # (P, H, step, Lp)
        buffer("answer_bias", torch.zeros(prompts, h, g, g, device=device, dtype=dtype))  # (P, H, step, G)
        buffer("own_rows", torch.eye(group, dtype=torch.bool, device=device)[:, :, None])  # (group, group, 1)
        buffer("ext", torch.zeros(0, config.dim_model, device=device, dtype=dtype))

    @staticmethod
    def shape_for(config: CPMBeeConfig, prompts: int, group: int, prompt_len: int, new_tokens: int) -> tuple[int, ...]:
        slots = _round_up(prompt_len, 8) + group * _round_up(new_tokens, 8)
        return (config.num_layers, prompts, config.num_heads, slots, config.dim_head)

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()

    @torch.no_grad()
    def set_bias(self, model: CPMBee, prompt: _Tokens, inputs: BeeInputs, answer_segments: torch.Tensor) -> None:
        """The bias tables of every step, from the same function (and so the same values) as decode_step's."""
        p, n = prompt.position.shape
        lp, g = self.prompt_slots, self.answer_slots
        device = prompt.position.device
        pad = lambda x: F.pad(x, (0, lp - n))  # noqa: E731  (padding slots are invalid: masked)
        steps = torch.arange(g, device=device, dtype=torch.int32).expand(p, g)
        answer = _Tokens(position=steps, segment=answer_segments.view(p, 1).to(torch.int32).expand(p, g),
                         sample=torch.zeros_like(steps), context=torch.ones(p, g, dtype=torch.bool, device=device),
                         valid=torch.ones(p, g, dtype=torch.bool, device=device))
        keys = _Tokens(*(torch.cat((pad(a.to(b.dtype)), b), dim=1) for a, b in zip(
            (prompt.position, prompt.segment, prompt.sample, prompt.context, prompt.valid),
            (answer.position, answer.segment, answer.sample, answer.context, answer.valid))))
        last = (inputs.length.long() - 1).clamp(min=0).to(device)[:, None]
        per_row = lambda x: x.to(device).gather(1, last).expand(p, g)  # noqa: E731  (the prompt's last token's)
        bias, _ = model._attention_bias(answer, keys, per_row(inputs.num_segments), per_row(inputs.segment_rel_offset),
                                        inputs.segment_rel.to(device), self.keys.dtype)
        self.prompt_bias.copy_(bias[..., :lp])
        # at step t the answer slots after t are not written yet
        future = torch.ones(g, g, dtype=torch.bool, device=device).triu(1)
        self.answer_bias.copy_(bias[..., lp:].masked_fill(future, float("-inf")))

    def step_bias(self, step: torch.Tensor) -> torch.Tensor:
        """(P, H, group, slots): the prompt part for every row, then each row's own answer slots only."""
        p, h, g, lp = self.prompt_bias.shape
        prompt = self.prompt_bias.index_select(2, step).expand(p, h, self.group, lp)
        answer = self.answer_bias.index_select(2, step)[:, :, :, None, :]  # (P, H, 1, 1, G)
        own = torch.where(self.own_rows, answer, torch.full_like(answer, float("-inf")))  # (P, H, group, group, G)
        return torch.cat((prompt, own.reshape(p, h, self.group, self.group * self.answer_slots)), dim=-1)

    def reorder(self, source: torch.Tensor, written: int) -> None:
        layers, p, h, _, dh = self.keys.shape
        g, lp, size = self.group, self.prompt_slots, self.answer_slots
        index = source.to(self.keys.device).long().view(1, p, 1, g, 1, 1).expand(layers, p, h, g, written, dh)
        for buf in (self.keys, self.values):
            answers = buf[:, :, :, lp:].view(layers, p, h, g, size, dh)[:, :, :, :, :written]
            answers.copy_(answers.gather(3, index))


class _KVCache:
    """Preallocated keys/values (per layer) and per-slot metadata; slots past what was written are invalid."""

    def __init__(self, keys, values, position, segment, sample, context, valid):
        self.keys, self.values = keys, values
        self.position, self.segment, self.sample, self.context, self.valid = position, segment, sample, context, valid
        b = position.shape[0]
        device = position.device
        # per-row constants of the prompt, used to look up the decoded tokens' segment relations
        self.num_segments = torch.zeros(b, dtype=torch.int32, device=device)
        self.rel_offset = torch.zeros(b, dtype=torch.int32, device=device)
        self.segment_rel = torch.zeros(b, 1, dtype=torch.int32, device=device)

    @classmethod
    def allocate(cls, config: CPMBeeConfig, batch: int, max_length: int, device, dtype) -> "_KVCache":
        shape = (batch, config.num_heads, max_length, config.dim_head)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        meta = lambda dt: torch.zeros(batch, max_length, dtype=dt, device=device)  # noqa: E731
        return cls(keys, values, meta(torch.int32), meta(torch.int32), meta(torch.int32), meta(torch.bool), meta(torch.bool))

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def max_length(self) -> int:
        return self.position.shape[1]

    def layers(self):
        return zip(self.keys, self.values)

    def reset(self) -> None:
        self.valid.zero_()

    def _metadata(self, tokens: _Tokens):
        return zip((self.position, self.segment, self.sample, self.context, self.valid),
                   (tokens.position, tokens.segment, tokens.sample, tokens.context, tokens.valid))

    def store_prompt(self, tokens: _Tokens, inputs: BeeInputs) -> None:
        n = tokens.position.shape[1]
        for buf, val in self._metadata(tokens):
            buf[:, :n] = val
        last = (inputs.length.long() - 1).clamp(min=0).to(self.position.device)[:, None]
        self.num_segments = inputs.num_segments.gather(1, last)[:, 0].to(torch.int32)
        self.rel_offset = inputs.segment_rel_offset.gather(1, last)[:, 0].to(torch.int32)
        self.segment_rel = inputs.segment_rel.to(torch.int32)

    def store_token(self, q: _Tokens, slot: torch.Tensor) -> None:
        for buf, val in self._metadata(q):
            buf.index_copy_(1, slot, val.to(buf.dtype))

    def key_tokens(self) -> _Tokens:
        return _Tokens(self.position, self.segment, self.sample, self.context, self.valid)

    def reorder(self, index: torch.Tensor, start: int = 0, end: int | None = None) -> None:
        index = index.to(self.position.device).long()
        end = self.max_length if end is None else end
        for buf in (*self.keys, *self.values):
            buf[:, :, start:end] = buf[:, :, start:end].index_select(0, index)
        for buf in (self.position, self.segment, self.sample, self.context, self.valid):
            buf[:, start:end] = buf[:, start:end].index_select(0, index)
        self.num_segments = self.num_segments.index_select(0, index)
        self.rel_offset = self.rel_offset.index_select(0, index)
        self.segment_rel = self.segment_rel.index_select(0, index)

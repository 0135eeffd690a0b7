"""What Chat decoding costs per prompt and per step, counted on the CPU (no GPU needed):

* rows prefilled for beam 3 over 8 prompts (the previous code prefilled prompts x beams rows);
* KV-cache bytes for 64 prompts x 3 beams at the CPM-Bee 10B config, 250-token prompts, 50 new tokens
  (allocated on the meta device: no memory used);
* operators per decode step (torch profiler, eager) of a 48-layer width-reduced CPM-Bee: the general
  `decode_step` (the previous path: bias rebuilt over the whole cache every step) vs the static `decode_next`.

    PYTHONPATH=. python benchmarks/chat_decode_costs.py
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from viscpm.config import CPMBeeConfig
from viscpm.cpmbee import CPMBee, GroupedKVCache, _KVCache
from viscpm.generation import GenerationConfig, RowSpec, SpecialIds, generate
from viscpm.inputs import BeeInputs


def synthetic_prompts(lengths: list[int], vocab: int, seed: int = 0) -> BeeInputs:
    """Right-padded single-segment prompts of the given lengths (answer segment 1)."""
    b, n = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(b, n, dtype=torch.int32)
    return BeeInputs(
        input_ids=torch.randint(10, vocab, (b, n), generator=gen, dtype=torch.int32), input_id_subs=zeros,
        position=torch.arange(n, dtype=torch.int32).expand(b, n).contiguous(), context=torch.ones(b, n, dtype=torch.bool),
        segment_ids=zeros.clone(), sample_ids=zeros.clone(), num_segments=torch.full((b, n), 2, dtype=torch.int32),
        segment_rel_offset=zeros.clone(), segment_rel=torch.tensor([[0, 2, 3, 0]], dtype=torch.int32).expand(b, 4).contiguous(),
        length=torch.tensor(lengths, dtype=torch.int32), ext_table_ids=torch.zeros(0, dtype=torch.int32),
        ext_table_sub=torch.zeros(0, dtype=torch.int32),
    )


def prefill_rows(prompts: int = 8, beams: int = 3) -> int:
    """Rows the first layer sees in the prefill of a beam search (the first call with more than one token)."""
    model = CPMBee(CPMBeeConfig(vocab_size=200, dim_model=32, num_heads=2, dim_head=16, dim_ff=32, num_layers=1,
                                dtype="float32")).init_random_(0).eval()
    seen: list[tuple[int, ...]] = []
    hook = model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    generate(model, synthetic_prompts([5 + i for i in range(prompts)], 200), [RowSpec(1, frozenset())] * prompts,
             GenerationConfig(strategy="beam", beam_size=beams, max_new_tokens=3), SpecialIds(6, 7, 1, 200))
    hook.remove()
    return seen[0][0]


def kv_bytes(prompts: int = 64, beams: int = 3, prompt_len: int = 250, new_tokens: int = 50) -> tuple[int, int]:
    """(previous: one cache row per beam over prompt + answer, now: grouped) bytes at the 10B config, bf16."""
    config = CPMBeeConfig.from_name("cpm-bee-10b")
    old = _KVCache.allocate(config, prompts * beams, prompt_len + new_tokens, "meta", torch.bfloat16)
    new = GroupedKVCache(config, prompts, beams, prompt_len, new_tokens, "meta", torch.bfloat16)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return size([*old.keys, *old.values]), size([new.keys, new.values])


# operators that only make views or allocate: no kernel on a GPU
_NO_KERNEL = {"aten::view", "aten::transpose", "aten::as_strided", "aten::reshape", "aten::select", "aten::slice",
              "aten::expand", "aten::unsqueeze", "aten::t", "aten::resolve_conj", "aten::_unsafe_view", "aten::empty",
              "aten::empty_strided", "aten::empty_like", "aten::result_type", "aten::detach", "aten::alias", "aten::lift_fresh"}


def decode_ops(layers: int = 48, batch: int = 1, prompt_len: int = 250) -> tuple[int, int]:
    """Operators that do work (leaf aten ops other than views and allocations: each ~ one kernel launch on a
    GPU) in one eager decode step: (general decode_step, static decode_next)."""
    config = CPMBeeConfig(vocab_size=1000, dim_model=64, num_heads=2, dim_head=32, dim_ff=128, num_layers=layers,
                          dtype="float32")
    model = CPMBee(config).init_random_(0).eval()
    inputs = synthetic_prompts([prompt_len] * batch, config.vocab_size)
    ids, zeros = torch.full((batch,), 6), torch.zeros(batch, dtype=torch.long)
    seg = torch.ones(batch, dtype=torch.long)

    def count(step) -> int:
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return sum(1 for e in prof.events()
                   if e.name.startswith("aten::") and not e.cpu_children and e.name not in _NO_KERNEL)

    model.setup_kv_cache(batch, prompt_len + 50)
    model.prefill(inputs)
    old = count(lambda: model.decode_step(ids, zeros, zeros, seg, slot=prompt_len))
    model.clear_kv_cache()
    model.start_decoding(inputs, seg, 1, 50)
    new = count(lambda: model.decode_next(ids, zeros, torch.zeros(1, dtype=torch.long)))
    model.end_decoding()
    return old, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"beam 3 over 8 prompts: {prefill_rows()} rows prefilled (previously 24)")
    old, new = kv_bytes()
    print(f"KV cache, 64 prompts x 3 beams, 10B, bf16, 250 + 50 tokens: {old / 2**30:.1f} GiB before, {new / 2**30:.1f} GiB now")
    old_ops, new_ops = decode_ops(args.layers)
    print(f"kernel-like ops per eager decode step ({args.layers} layers): {old_ops} general decode_step, {new_ops} static decode_next")


if __name__ == "__main__":
    main()

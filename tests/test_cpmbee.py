"""CPM-Bee unit tests on small random models (no fixtures needed): KV-cache decoding equals a full forward,
batching with padding changes no row, cache reordering, dtypes, configs and checkpoint formats."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from viscpm.checkpoint import (
    SAFETENSORS_INDEX,
    CheckpointError,
    CPMBEE_KEY_MAP,
    cpmbee_original_keys,
    load_cpmbee,
    read_state_dict,
    reverse_key_map,
)
from viscpm.config import CPMBeeConfig
from viscpm.cpmbee import CPMBee, position_bucket
from viscpm.inputs import BeeInputs

pytestmark = pytest.mark.numeric  # rerun by .ci/run on the AVX2 and baseline CPU kernels

CONFIG = CPMBeeConfig(vocab_size=300, dim_model=32, num_heads=4, dim_head=16, dim_ff=48, num_layers=2, dtype="float32")
ANSWER_SEGMENT = 3
NUM_SEGMENTS = 4


def random_model(config: CPMBeeConfig = CONFIG, seed: int = 0) -> CPMBee:
    return CPMBee(config).init_random_(seed).eval()


def segment_table(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(2, 40, (NUM_SEGMENTS, NUM_SEGMENTS), generator=gen, dtype=torch.int32)
    table.fill_diagonal_(0)
    return table.flatten()


def prompt(length: int, seed: int, ext: bool = False) -> dict[str, torch.Tensor]:
    """One prompt of `length` tokens over segments 0..2 (answer segment 3 comes later)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (length,), generator=gen, dtype=torch.int32)
    subs = torch.zeros(length, dtype=torch.int32)
    if ext:
        ids[2], subs[2] = 1, 1
        ids[3], subs[3] = 1, 2
    cut = sorted(torch.randperm(length - 2, generator=gen)[:2].add(1).tolist())
    segments = torch.zeros(length, dtype=torch.int32)
    segments[cut[0]:] = 1
    segments[cut[1]:] = 2
    positions = torch.arange(length, dtype=torch.int32)
    return {"ids": ids, "subs": subs, "segments": segments, "positions": positions, "rel": segment_table(seed)}


def collate(rows: list[dict[str, torch.Tensor]], ext_ids=(), ext_subs=(), contexts=None) -> BeeInputs:
    """Right-pad rows (dicts of 1-D tensors) into BeeInputs."""
    n = max(r["ids"].shape[0] for r in rows)
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[0]))  # noqa: E731
    stack = lambda key: torch.stack([pad(r[key]) for r in rows])  # noqa: E731
    ctx = [torch.ones(r["ids"].shape[0], dtype=torch.bool) if contexts is None else contexts[i] for i, r in enumerate(rows)]
    lengths = torch.tensor([r["ids"].shape[0] for r in rows], dtype=torch.int32)
    valid = torch.arange(n)[None] < lengths[:, None]
    return BeeInputs(
        input_ids=stack("ids"),
        input_id_subs=stack("subs"),
        position=stack("positions"),
        context=torch.stack([pad(c) for c in ctx]).bool(),
        segment_ids=stack("segments"),
        sample_ids=torch.zeros(len(rows), n, dtype=torch.int32),
        num_segments=torch.where(valid, NUM_SEGMENTS, 0).to(torch.int32),
        segment_rel_offset=torch.zeros(len(rows), n, dtype=torch.int32),
        segment_rel=torch.stack([r["rel"] for r in rows]),
        length=lengths,
        ext_table_ids=torch.tensor(list(ext_ids), dtype=torch.int32),
        ext_table_sub=torch.tensor(list(ext_subs), dtype=torch.int32),
    )


EXT = ([1, 1], [1, 2])


def test_incremental_decode_equals_full_forward() -> None:
    """Decoding answer tokens one at a time from the cache gives the logits of a full forward in which the
    answer tokens are causal (context 0) - what the original's decoding computes."""
    model = random_model()
    p = prompt(11, seed=1, ext=True)
    answer = torch.tensor([6, 40, 41, 1, 42], dtype=torch.int32)
    answer_subs = torch.tensor([0, 0, 0, 1, 0], dtype=torch.int32)
    n = answer.shape[0]
    full = {
        "ids": torch.cat([p["ids"], answer]),
        "subs": torch.cat([p["subs"], answer_subs]),
        "segments": torch.cat([p["segments"], torch.full((n,), ANSWER_SEGMENT, dtype=torch.int32)]),
        "positions": torch.cat([p["positions"], torch.arange(n, dtype=torch.int32)]),
        "rel": p["rel"],
    }
    context = torch.cat([torch.ones(11, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    full_logits, _ = model(collate([full], *EXT, contexts=[context]))

    model.setup_kv_cache(1, 32)
    last, _ = model.prefill(collate([p], *EXT))
    torch.testing.assert_close(last[0], full_logits[0, 10], atol=1e-5, rtol=0)
    for i in range(n):
        logits, _ = model.decode_step(
            answer[i : i + 1], answer_subs[i : i + 1], torch.tensor([i]), torch.tensor([ANSWER_SEGMENT]), slot=11 + i
        )
        torch.testing.assert_close(logits[0], full_logits[0, 11 + i], atol=1e-5, rtol=0)


def test_batch_rows_equal_rows_alone() -> None:
    """Rows of different lengths, right-padded into one batch, prefill and decode exactly as they do alone."""
    model = random_model(seed=3)
    rows = [prompt(7, seed=10, ext=True), prompt(13, seed=11), prompt(9, seed=12, ext=True)]
    steps = torch.tensor([[6, 6, 6], [50, 51, 1], [52, 53, 54]], dtype=torch.int32)
    subs = torch.tensor([[0, 0, 0], [0, 0, 2], [0, 0, 0]], dtype=torch.int32)

    def run(batch_rows: list[dict], cols: list[int]) -> list[torch.Tensor]:
        inputs = collate(batch_rows, *EXT)
        model.setup_kv_cache(len(batch_rows), inputs.seq_len + steps.shape[0])
        out = [model.prefill(inputs)[0]]
        for s in range(steps.shape[0]):
            logits, _ = model.decode_step(
                steps[s, cols], subs[s, cols], torch.full((len(cols),), s), torch.full((len(cols),), ANSWER_SEGMENT),
                slot=inputs.seq_len + s,
            )
            out.append(logits)
        return out

    batched = run(rows, [0, 1, 2])
    for i, row in enumerate(rows):
        alone = run([row], [i])
        for step, (b, a) in enumerate(zip(batched, alone)):
            torch.testing.assert_close(b[i], a[0], atol=1e-5, rtol=0, msg=f"row {i} step {step}")


def test_padding_rows_are_finite_and_do_not_leak() -> None:
    model = random_model(seed=4)
    short, long = prompt(5, seed=20), prompt(12, seed=21)
    _, hidden = model(collate([short, long]))
    assert torch.isfinite(hidden).all()
    _, alone = model(collate([short]))
    torch.testing.assert_close(hidden[0, :5], alone[0], atol=1e-5, rtol=0)


def test_reorder_kv_cache_moves_rows() -> None:
    model = random_model(seed=5)
    a, b = prompt(8, seed=30), prompt(8, seed=31)
    inputs = collate([a, b])
    model.setup_kv_cache(2, 12)
    model.prefill(inputs)
    model.reorder_kv_cache(torch.tensor([1, 1]))  # both rows become row 1
    logits, _ = model.decode_step(torch.tensor([6, 6]), torch.zeros(2), torch.zeros(2), torch.full((2,), ANSWER_SEGMENT), slot=8)
    model.setup_kv_cache(1, 12)
    model.prefill(collate([b]))
    expected, _ = model.decode_step(torch.tensor([6]), torch.zeros(1), torch.zeros(1), torch.tensor([ANSWER_SEGMENT]), slot=8)
    torch.testing.assert_close(logits, expected.expand(2, -1), atol=1e-5, rtol=0)


def test_prefill_rejects_inputs_larger_than_the_cache() -> None:
    model = random_model()
    model.setup_kv_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model.prefill(collate([prompt(6, seed=1)]))
    model.clear_kv_cache()
    with pytest.raises(RuntimeError, match="setup_kv_cache"):
        model.prefill(collate([prompt(6, seed=1)]))


def test_bfloat16_runs_close_to_float32() -> None:
    model = random_model(seed=6)
    inputs = collate([prompt(10, seed=40)])
    _, ref = model(inputs)
    _, low = model.to(torch.bfloat16)(inputs)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_position_bucket_shape_of_the_original() -> None:
    rel = torch.tensor([0, 1, -1, 63, 64, -64, 100, 2047, 5000, -5000])
    buckets = position_bucket(rel, num_buckets=256, max_distance=2048)
    # exact below 64 per direction, positive distances in the upper half, saturating at the last bucket
    assert buckets[:4].tolist() == [0, 128 + 1, 1, 128 + 63]
    assert buckets[4] == 128 + 64 and buckets[5] == 64
    assert buckets[8] == 255 and buckets[9] == 127
    assert (buckets >= 0).all() and (buckets < 256).all()


# ---- config ------------------------------------------------------------------------------------------------
def test_config_presets_and_original_file(tmp_path) -> None:
    big = CPMBeeConfig.from_name("cpm-bee-10b")
    assert (big.dim_model, big.num_layers, big.num_heads, big.dim_head, big.dim_ff) == (4096, 48, 32, 128, 10240)
    original = {"vocab_size": 86583, "dim_model": 4096, "dim_ff": 10240, "num_layers": 48, "num_heads": 32, "dim_head": 128,
                "dropout_p": 0.0, "position_bias_num_buckets": 256, "position_bias_num_segment_buckets": 256,
                "position_bias_max_distance": 2048, "eps": 1e-6, "half": True}
    path = tmp_path / "cpm-bee-10b.json"
    path.write_text(json.dumps(original))
    assert CPMBeeConfig.from_file(path) == big
    assert CPMBeeConfig.from_dict(big.to_dict()) == big
    with pytest.raises(ValueError, match="unknown CPM-Bee config keys"):
        CPMBeeConfig.from_dict({**original, "dim_mdoel": 3})
    with pytest.raises(ValueError, match="unknown CPM-Bee preset"):
        CPMBeeConfig.from_name("cpm-bee-1t")


def test_tiny_preset_matches_the_synthetic_vocab() -> None:
    from viscpm.tokenizer import CPMBeeTokenizer

    assert CPMBeeConfig.from_name("tiny").vocab_size == CPMBeeTokenizer.synthetic().vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        CPMBeeConfig(vocab_size=0)


def test_legacy_pickle_loads_without_mmap(tmp_path) -> None:
    model = random_model(seed=9)
    path = tmp_path / "legacy.pt"
    torch.save(original_state_dict(model), path, _use_new_zipfile_serialization=False)
    loaded, report = load_cpmbee(read_state_dict(path), CONFIG)
    assert report.ok
    torch.testing.assert_close(loaded.embedding, model.embedding, atol=0, rtol=0)


def test_10b_builds_on_meta_with_the_right_size() -> None:
    with torch.device("meta"):
        model = CPMBee(CPMBeeConfig.from_name("cpm-bee-10b"))
    n = sum(p.numel() for p in model.parameters())
    assert 9.5e9 < n < 10.5e9, n


# ---- checkpoints -------------------------------------------------------------------------------------------
def original_state_dict(model: CPMBee) -> dict[str, torch.Tensor]:
    """Our weights under the original key names (plus a non-LLM key a Chat checkpoint would also hold)."""
    reverse = reverse_key_map(CPMBEE_KEY_MAP, cpmbee_original_keys(model.config))
    state = {reverse[k]: v.clone() for k, v in model.state_dict().items()}
    state["vpm.beit3.vision_embed.cls_token"] = torch.zeros(1, 1, 8)
    return state


def test_pickle_checkpoint_round_trip(tmp_path) -> None:
    model = random_model(seed=7)
    path = tmp_path / "pytorch_model.v1.bin"
    torch.save(original_state_dict(model), path)
    loaded, report = load_cpmbee(read_state_dict(path), CONFIG)
    assert report.ok and len(report.loaded) == len(model.state_dict())
    inputs = collate([prompt(9, seed=50)])
    torch.testing.assert_close(loaded(inputs)[0], model(inputs)[0], atol=0, rtol=0)


def test_safetensors_shards_and_dtype(tmp_path) -> None:
    from safetensors.torch import save_file

    model = random_model(seed=8)
    state = original_state_dict(model)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps(index))
    loaded, _ = load_cpmbee(read_state_dict(tmp_path), CONFIG, dtype=torch.bfloat16)
    assert loaded.embedding.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.embedding.float(), model.embedding.to(torch.bfloat16).float())


def test_wrong_config_is_reported(tmp_path) -> None:
    state = original_state_dict(random_model())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_cpmbee(state, replace(CONFIG, dim_ff=64))
    with pytest.raises(CheckpointError, match="missing"):
        load_cpmbee(state, replace(CONFIG, num_layers=3))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_cpmbee(state, replace(CONFIG, num_layers=1))


def test_unsupported_files_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.bin")
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        read_state_dict(bad)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_state_dict(not_dict)


def test_partial_reorder_moves_only_the_answer_slots() -> None:
    """Two beams of one prompt diverge at the first answer token; copying beam 1's answer slots over beam 0
    (the prompt slots are shared) makes both continue exactly like beam 1."""
    model = random_model(seed=10)
    p = prompt(8, seed=60)
    seg = torch.full((2,), ANSWER_SEGMENT)
    model.setup_kv_cache(2, 12)
    model.prefill(collate([p, p]))
    model.decode_step(torch.tensor([40, 41]), torch.zeros(2), torch.zeros(2), seg, slot=8)
    model.reorder_kv_cache(torch.tensor([1, 1]), start=8, end=9)
    both, _ = model.decode_step(torch.tensor([42, 42]), torch.zeros(2), torch.ones(2), seg, slot=9)
    model.setup_kv_cache(1, 12)
    model.prefill(collate([p]))
    model.decode_step(torch.tensor([41]), torch.zeros(1), torch.zeros(1), seg[:1], slot=8)
    alone, _ = model.decode_step(torch.tensor([42]), torch.zeros(1), torch.ones(1), seg[:1], slot=9)
    torch.testing.assert_close(both, alone.expand(2, -1), atol=1e-5, rtol=0)

"""CPM-Bee against golden data recorded from the original implementation.

Every config value, input, expected tensor and shape is read from the fixture folder, so the same tests pass on
any fixture set in that format. Tolerance: 1e-4 absolute on hidden states and logits (fp32)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from viscpm.checkpoint import CheckpointError, cpmbee_original_keys, load_cpmbee, read_state_dict
from viscpm.config import CPMBeeConfig
from viscpm.inputs import BeeInputs

from reference_data import Fixture, assert_close, batched_chat_inputs, chat_inputs, first_decode_token, paint_inputs

pytestmark = [pytest.mark.parity, pytest.mark.numeric]


# ---- checkpoint --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["chat", "paint"])
def test_checkpoint_loads_strictly(reference_dir: Path, kind: str) -> None:
    fx_config = json.loads((reference_dir / f"{kind}_config.json").read_text(encoding="utf-8"))
    config = CPMBeeConfig.from_dict(fx_config["llm"]["config_kwargs"])
    state = read_state_dict(reference_dir / f"{kind}_model.safetensors")
    llm_keys = sorted(k for k in state if k.startswith("llm."))
    assert llm_keys == sorted(cpmbee_original_keys(config))
    model, report = load_cpmbee(state, config)
    assert report.ok and not report.dropped
    assert len(report.loaded) == len(llm_keys) == len(model.state_dict())
    # one tensor really lands where the key map says it does
    assert torch.equal(model.embedding, state["llm.input_embedding.weight"])
    assert torch.equal(model.layers[-1].ffn.w_down.weight, state[f"llm.encoder.layers.{config.num_layers - 1}.ffn.ffn.w_out.weight"])


def test_checkpoint_reports_bad_keys(reference_dir: Path) -> None:
    fx_config = json.loads((reference_dir / "chat_config.json").read_text(encoding="utf-8"))
    config = CPMBeeConfig.from_dict(fx_config["llm"]["config_kwargs"])
    state = dict(read_state_dict(reference_dir / "chat_model.safetensors"))
    removed = "llm.encoder.layers.0.ffn.ffn.w_in.w_1.weight"
    del state[removed]
    state["llm.encoder.layers.0.extra.weight"] = torch.zeros(1)
    state["llm.encoder.output_layernorm.weight"] = torch.zeros(config.dim_model + 1)
    with pytest.raises(CheckpointError) as err:
        load_cpmbee(state, config)
    message = str(err.value)
    for expected in ("layers.0.ffn.w_up.weight", "llm.encoder.layers.0.extra.weight", "llm.encoder.output_layernorm.weight"):
        assert expected in message


# ---- embedding ---------------------------------------------------------------------------------------------
def test_embedding_matches_outside_the_image(chat_reference: Fixture) -> None:
    chat = chat_reference
    for k, case in enumerate(chat.cases):
        inputs = chat_inputs(chat, k)
        expected = chat.t(f"case{k}.vllm_embedding")
        ours = chat.model.embed(inputs.input_ids, inputs.input_id_subs)
        keep = torch.ones(inputs.seq_len, dtype=torch.bool)
        for begin, end in chat.t(f"case{k}.inputs.image_bound")[0].tolist():
            keep[begin:end] = False
        assert_close(ours[:, keep], expected[:, keep], f"case {case['name']} token embedding")


# ---- prompt pass -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["forward", "prefill"])
def test_chat_prompt_pass(chat_reference: Fixture, mode: str) -> None:
    chat = chat_reference
    model = chat.model
    for k, case in enumerate(chat.cases):
        name = case["name"]
        inputs = chat_inputs(chat, k)
        hidden_in = chat.t(f"case{k}.vllm_embedding")
        if mode == "forward":
            logits, hidden = model(inputs, hidden_states=hidden_in)
            last_logits = logits[:, -1]
        else:
            model.setup_kv_cache(1, inputs.seq_len + 4)
            last_logits, hidden = model.prefill(inputs, hidden_states=hidden_in)
            logits = model.logits(hidden, model.ext_embedding(inputs.ext_table_ids, inputs.ext_table_sub))
        assert_close(hidden, chat.t(f"case{k}.prompt_hidden"), f"{name} prompt hidden")
        assert_close(last_logits, chat.t(f"case{k}.prompt_logits_last"), f"{name} last prompt logits")
        full = logits[0]
        assert_close(torch.logsumexp(full, dim=-1), chat.t(f"case{k}.prompt_logits_logsumexp"), f"{name} logsumexp")
        cols = chat.t(f"case{k}.prompt_logits_sel_cols")
        assert_close(full[:, cols], chat.t(f"case{k}.prompt_logits_sel"), f"{name} selected logit columns")
        top_values = chat.t(f"case{k}.prompt_logits_top8_values")
        top_indices = chat.t(f"case{k}.prompt_logits_top8_indices")
        assert_close(full.topk(top_values.shape[-1], dim=-1).values, top_values, f"{name} top-k values")
        assert_close(full.gather(1, top_indices), top_values, f"{name} logits at the reference's top-k ids")


def test_chat_first_decode_step(chat_reference: Fixture) -> None:
    chat = chat_reference
    model = chat.model
    for k, case in enumerate(chat.cases):
        inputs = chat_inputs(chat, k)
        model.setup_kv_cache(1, inputs.seq_len + 8)
        model.prefill(inputs, hidden_states=chat.t(f"case{k}.vllm_embedding"))
        logits, hidden = model.decode_step(**first_decode_token(chat, k), slot=inputs.seq_len)
        assert_close(hidden, chat.t(f"case{k}.step0_hidden")[:, 0], f"{case['name']} step-0 hidden")
        assert_close(logits, chat.t(f"case{k}.step0_logits"), f"{case['name']} step-0 logits")


def test_beam_rows_decode_like_the_reference(chat_reference: Fixture) -> None:
    """Replay the first two decode steps of the reference beam search (3 beams of one prompt): step 0 feeds bos
    to identical beams, step 1 feeds the tokens the search picked; raw top-5 logits must match per beam."""
    chat = chat_reference
    model = chat.model
    for k, case in enumerate(chat.cases):
        inputs = chat_inputs(chat, k)
        beams = chat.t(f"case{k}.beam.step_input_ids").shape[1]
        batch = BeeInputs(**{f: (v.expand(beams, *v.shape[1:]) if v.dim() == 2 else (v.expand(beams) if f == "length" else v))
                             for f, v in vars(inputs).items()})
        model.setup_kv_cache(beams, inputs.seq_len + 8)
        model.prefill(batch, hidden_states=chat.t(f"case{k}.vllm_embedding").expand(beams, -1, -1))
        # after step 0 all beams hold the same cache, so any reorder is the identity for step 1
        for step in range(2):
            logits, _ = model.decode_step(
                chat.t(f"case{k}.beam.step_input_ids")[step],
                chat.t(f"case{k}.beam.step_input_sub")[step],
                chat.t(f"case{k}.beam.step_position")[step],
                chat.t(f"case{k}.beam.step_segment")[step],
                slot=inputs.seq_len + step,
            )
            expected = chat.t(f"case{k}.beam.step_logits_top5_values")[step]
            indices = chat.t(f"case{k}.beam.step_logits_top5_indices")[step]
            assert_close(logits.gather(1, indices), expected, f"{case['name']} decode step {step} top-5 logits")


# ---- paint: training-style forward over right-padded cond/uncond inputs -------------------------------------
def test_paint_hidden_states(paint_reference: Fixture) -> None:
    paint = paint_reference
    for k, case in enumerate(paint.cases):
        for branch in ("cond", "uncond"):
            inputs = paint_inputs(paint, k, branch)
            _, hidden = paint.model(inputs, return_logits=False)
            # every position, padding included: the original feeds them all to the UNet
            assert_close(hidden, paint.t(f"case{k}.llm_hidden_{branch}"), f"{case['name']} {branch} hidden")


def test_paint_cond_uncond_batched(paint_reference: Fixture) -> None:
    """cond and uncond of a case in one batch give the same hidden states as one at a time."""
    paint = paint_reference
    for k, case in enumerate(paint.cases):
        cond, uncond = paint_inputs(paint, k, "cond"), paint_inputs(paint, k, "uncond")
        rel = max(cond.segment_rel.shape[1], uncond.segment_rel.shape[1])
        pad_rel = lambda x: torch.nn.functional.pad(x, (0, rel - x.shape[1]))  # noqa: E731
        batch = BeeInputs(**{
            f: torch.cat([pad_rel(getattr(uncond, f)), pad_rel(getattr(cond, f))]) if f == "segment_rel"
            else (getattr(cond, f) if f.startswith("ext_") else torch.cat([getattr(uncond, f), getattr(cond, f)]))
            for f in vars(cond)
        })
        _, hidden = paint.model(batch, return_logits=False)
        assert_close(hidden[0:1], paint.t(f"case{k}.llm_hidden_uncond"), f"{case['name']} batched uncond")
        assert_close(hidden[1:2], paint.t(f"case{k}.llm_hidden_cond"), f"{case['name']} batched cond")


def test_fixture_metadata_is_consistent(chat_reference: Fixture) -> None:
    """Guards the reading of the fixture format itself: the recorded prompt length and logit width."""
    chat = chat_reference
    for k, case in enumerate(chat.cases):
        inputs = chat_inputs(chat, k)
        assert inputs.seq_len == int(case["prompt_length"])
        n_cols = chat.config.vocab_size + inputs.ext_table_ids.shape[0]
        assert n_cols == int(case["num_logit_columns"])
        predict = ast.literal_eval(case["predict_segments"]) if isinstance(case["predict_segments"], str) else case["predict_segments"]
        assert int(chat.t(f"case{k}.beam.step_segment")[0, 0]) == predict[0][0]


# ---- KV cache and batching on the reference weights and inputs ---------------------------------------------
def test_kv_cache_decode_equals_full_forward(chat_reference: Fixture) -> None:
    """Feeding the reference's greedy answer one token at a time from the cache gives the same logits as one
    full forward over prompt + answer, with the answer tokens causal (context 0)."""
    chat = chat_reference
    model = chat.model
    for k, case in enumerate(chat.cases):
        inputs = chat_inputs(chat, k)
        prompt_embedding = chat.t(f"case{k}.vllm_embedding")
        answer = chat.t(f"case{k}.greedy.step_input_ids")[:, 0]
        n, length = answer.shape[0], inputs.seq_len
        segment = int(chat.t(f"case{k}.beam.step_segment")[0, 0])
        subs = torch.zeros_like(answer)
        positions = torch.arange(n, dtype=torch.int32)
        cat = lambda a, b: torch.cat([a, b[None].to(a.dtype)], dim=1)  # noqa: E731
        full = BeeInputs(
            input_ids=cat(inputs.input_ids, answer),
            input_id_subs=cat(inputs.input_id_subs, subs),
            position=cat(inputs.position, positions),
            context=cat(inputs.context, torch.zeros(n, dtype=torch.bool)),
            segment_ids=cat(inputs.segment_ids, torch.full((n,), segment)),
            sample_ids=cat(inputs.sample_ids, torch.zeros(n)),
            num_segments=cat(inputs.num_segments, inputs.num_segments[0, -1].expand(n)),
            segment_rel_offset=cat(inputs.segment_rel_offset, torch.zeros(n)),
            segment_rel=inputs.segment_rel,
            length=inputs.length + n,
            ext_table_ids=inputs.ext_table_ids,
            ext_table_sub=inputs.ext_table_sub,
        )
        hidden_in = torch.cat([prompt_embedding, model.embed(answer[None], subs[None])], dim=1)
        full_logits, _ = model(full, hidden_states=hidden_in)

        model.setup_kv_cache(1, length + n)
        model.prefill(inputs, hidden_states=prompt_embedding)
        for i in range(n):
            logits, _ = model.decode_step(answer[i : i + 1], subs[i : i + 1], positions[i : i + 1],
                                          torch.tensor([segment]), slot=length + i)
            assert_close(logits[0], full_logits[0, length + i], f"{case['name']} cached step {i} vs full forward", atol=1e-5)


def test_chat_cases_batched_equal_alone(chat_reference: Fixture) -> None:
    """All chat cases (different prompt lengths and ext tables) in one right-padded batch reproduce each case's
    recorded prompt logits and first decode step."""
    chat = chat_reference
    model = chat.model
    cases = [chat_inputs(chat, k) for k in range(len(chat.cases))]
    batch, hidden_in, offsets = batched_chat_inputs(chat)
    n = batch.seq_len
    model.setup_kv_cache(len(cases), n + 1)
    last, _ = model.prefill(batch, hidden_states=hidden_in)
    first = [first_decode_token(chat, k) for k in range(len(cases))]
    step, _ = model.decode_step(*(torch.cat([f[key] for f in first]) for key in ("token_ids", "token_subs", "positions", "segments")), slot=n)
    vocab = chat.config.vocab_size
    for k, c in enumerate(cases):
        own = torch.cat([torch.arange(vocab), vocab + offsets[k] + torch.arange(c.ext_table_ids.shape[0])])
        assert_close(last[k, own], chat.t(f"case{k}.prompt_logits_last")[0], f"{chat.cases[k]['name']} batched prompt logits")
        assert_close(step[k, own], chat.t(f"case{k}.step0_logits")[0], f"{chat.cases[k]['name']} batched step-0 logits")

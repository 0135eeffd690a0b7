"""Readers for the golden-data folder (VISCPM_REFERENCE_DIR) shared by the parity tests."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from viscpm.checkpoint import load_cpmbee, read_state_dict
from viscpm.config import CPMBeeConfig
from viscpm.inputs import BeeInputs

ATOL = 1e-4


def literal(value: Any) -> Any:
    """Some JSON fields hold Python reprs (e.g. "[[8, 1]]"); return them as Python values."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = _max_diff(actual, expected)
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


class Fixture:
    """One model (chat or paint) of the reference set: its config, weights, cases and tensors."""

    def __init__(self, ref: Path, kind: str) -> None:
        self.config_json = json.loads((ref / f"{kind}_config.json").read_text(encoding="utf-8"))
        self.cases = json.loads((ref / f"{kind}_cases.json").read_text(encoding="utf-8"))["cases"]
        self.tensors = load_file(str(ref / f"{kind}_cases.safetensors"))
        self.config = CPMBeeConfig.from_dict(self.config_json["llm"]["config_kwargs"])
        self.model, self.report = load_cpmbee(read_state_dict(ref / f"{kind}_model.safetensors"), self.config)
        self.model.eval()

    def t(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def chat_inputs(fx: Fixture, k: int) -> BeeInputs:
    """The recorded `_process_list` output of chat case k (batch 1) as BeeInputs."""
    t = lambda name: fx.t(f"case{k}.inputs.{name}")  # noqa: E731
    ids = t("input_ids")
    return BeeInputs(
        input_ids=ids,
        input_id_subs=t("input_id_subs"),
        position=t("input_pos"),
        context=t("context").bool(),
        segment_ids=t("segment_ids"),
        sample_ids=t("sample_idx"),
        num_segments=t("num_segments"),
        segment_rel_offset=t("segment_rel_offset"),
        segment_rel=t("segment_rel"),
        length=torch.tensor([ids.shape[1]], dtype=torch.int32),
        ext_table_ids=t("batch_ext_table_ids"),
        ext_table_sub=t("batch_ext_table_sub"),
    )


def paint_inputs(fx: Fixture, k: int, branch: str) -> BeeInputs:
    t = lambda name: fx.t(f"case{k}.inputs.{branch}.{name}")  # noqa: E731
    ids = t("input_ids")
    return BeeInputs(
        input_ids=ids,
        input_id_subs=t("input_id_subs"),
        # the original's training-style forward uses arange positions
        position=torch.arange(ids.shape[1], dtype=torch.int32).expand_as(ids),
        context=t("context").bool(),
        segment_ids=t("segment_ids"),
        sample_ids=t("sample_ids"),
        num_segments=t("num_segments"),
        segment_rel_offset=t("segment_rel_offset"),
        segment_rel=t("segment_rel"),
        length=t("length"),
        ext_table_ids=t("ext_table_ids"),
        ext_table_sub=t("ext_table_sub"),
    )


def first_decode_token(fx: Fixture, k: int) -> dict[str, torch.Tensor]:
    """What the original fed at its first decode step (beam row 0): bos at a position in the answer segment."""
    return {
        "token_ids": fx.t(f"case{k}.beam.step_input_ids")[0, :1],
        "token_subs": fx.t(f"case{k}.beam.step_input_sub")[0, :1],
        "positions": fx.t(f"case{k}.beam.step_position")[0, :1],
        "segments": fx.t(f"case{k}.beam.step_segment")[0, :1],
    }




def batched_chat_inputs(fx: Fixture) -> tuple[BeeInputs, torch.Tensor, list[int]]:
    """Every chat case right-padded into one batch: (inputs, spliced prompt embeddings, each case's offset into
    the concatenated ext columns)."""
    cases = [chat_inputs(fx, k) for k in range(len(fx.cases))]
    n = max(c.seq_len for c in cases)
    r = max(c.segment_rel.shape[1] for c in cases)
    pad = lambda x, size: torch.nn.functional.pad(x, (0, size - x.shape[-1]))  # noqa: E731
    offsets = [sum(c.ext_table_ids.shape[0] for c in cases[:k]) for k in range(len(cases))]
    batch = BeeInputs(
        **{f: torch.cat([pad(getattr(c, f), r if f == "segment_rel" else n) for c in cases])
           for f in ("input_ids", "input_id_subs", "position", "context", "segment_ids", "sample_ids",
                     "num_segments", "segment_rel_offset", "segment_rel")},
        length=torch.cat([c.length for c in cases]),
        ext_table_ids=torch.cat([c.ext_table_ids for c in cases]),
        ext_table_sub=torch.cat([c.ext_table_sub for c in cases]),
    )
    hidden = torch.cat([torch.nn.functional.pad(fx.t(f"case{k}.vllm_embedding"), (0, 0, 0, n - c.seq_len))
                        for k, c in enumerate(cases)])
    return batch, hidden, offsets

"""Structured CPM-Bee inputs: a nested dict -> token ids, subs, segments, segment relations, ext tables.

CPM-Bee reads a *tree* of text: every key and every leaf of a nested dict is its own segment, wrapped in
``<s> ... </s>``. Attention inside a segment uses relative positions; across segments it uses a bucket
that encodes how far up and down the tree the two segments are apart (``segment_rel``).

``BeeInputs`` is the batched, padded tensor form the model consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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

"""The one batch type shared by both seams (Policy and Generator) and every loss.

Conventions (shapes use B = rows, T = tokens per row):

- ``logprobs[b, t]`` is ``log p(input_ids[b, t] | input_ids[b, :t])`` under the policy;
  column 0 has no context and is always 0. Logprob tensors therefore line up with
  ``input_ids`` and ``loss_mask`` selects the tokens that count.
- ``loss_mask[b, t] = 1`` where ``input_ids[b, t]`` is a target: an assistant token in SFT,
  a generated token in GRPO. Padding, prompts and system/user turns are 0.
- ``position_ids`` restart at 0 at each packed document; ``document_ids`` number the
  documents of a row from 1 and are 0 on padding. Attention never crosses documents.

Worked example: two documents packed in one row of T = 8, then one pad::

    input_ids    = [[ 5, 9, 7, 2,  5, 8, 2,  0]]   # doc 1 = 5 9 7 2, doc 2 = 5 8 2, pad
    position_ids = [[ 0, 1, 2, 3,  0, 1, 2,  0]]
    document_ids = [[ 1, 1, 1, 1,  2, 2, 2,  0]]
    loss_mask    = [[ 0, 0, 1, 1,  0, 1, 1,  0]]   # prompts are "5 9" and "5"

Token 5 at t = 4 starts doc 2, so it is never a target (its logprob would be
conditioned on doc 1, which it cannot see).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """A padded (optionally packed) batch. Optional fields are GRPO-only.

    input_ids:       LongTensor[B, T]
    position_ids:    LongTensor[B, T]
    document_ids:    LongTensor[B, T]  (0 = padding, 1.. = document index within the row)
    loss_mask:       FloatTensor[B, T]
    advantages:      FloatTensor[B]     one advantage per sequence (broadcast over its tokens)
    old_logprobs:    FloatTensor[B, T]  logprobs of the policy that produced the rollouts
    ref_logprobs:    FloatTensor[B, T]  logprobs of the frozen reference policy
    rollout_logprobs:FloatTensor[B, T]  logprobs reported by the generator (for mismatch metrics)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor field to ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return Batch(**moved)

    def select(self, rows: slice | torch.Tensor) -> "Batch":
        """Rows ``rows`` of every tensor field (used to split into micro-batches)."""
        picked = {
            f.name: (v[rows] if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return Batch(**picked)

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def with_fields(self, **changes: torch.Tensor | None) -> "Batch":
        return replace(self, **changes)

    def padded_to(self, rows: int, width: int) -> "Batch":
        """Zero-padded to ``[rows, width]``: added tokens are padding (document 0, no loss),
        added rows have no targets (advantage 0)."""
        def pad(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:
                return None
            if v.dim() == 1:
                return torch.nn.functional.pad(v, (0, rows - v.shape[0]))
            return torch.nn.functional.pad(v, (0, width - v.shape[1], 0, rows - v.shape[0]))

        return Batch(**{f.name: pad(getattr(self, f.name)) for f in fields(self)})


def batch_from_sequences(
    sequences: list[list[int]],
    target_masks: list[list[int]],
    pad_id: int,
) -> Batch:
    """Right-pad one document per row. ``target_masks[i][t] = 1`` marks targets of row i."""
    if len(sequences) != len(target_masks):
        raise ValueError("sequences and target_masks differ in length")
    width = max(len(s) for s in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    document_ids = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width), dtype=torch.float32)
    for i, (seq, mask) in enumerate(zip(sequences, target_masks)):
        n = len(seq)
        if len(mask) != n:
            raise ValueError(f"row {i}: mask has {len(mask)} entries for {n} tokens")
        input_ids[i, :n] = torch.tensor(seq, dtype=torch.long)
        position_ids[i, :n] = torch.arange(n)
        document_ids[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(mask, dtype=torch.float32)
    loss_mask[:, 0] = 0.0
    return Batch(input_ids, position_ids, document_ids, loss_mask)

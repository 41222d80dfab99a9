"""Packed sequences: several documents laid end to end in one row of a batch.

`PackedDocuments` travels through the model as Megatron's `packed_seq_params`. Every token knows
its document (`seq_idx`, non-decreasing along a row) and its position inside it (`position_ids`):
RoPE restarts at each document, attention stays inside it, and the causal conv and the SSM scan
restart from a zero state at its first token. So a packed row computes, document by document,
exactly what each document computes alone.
"""

from dataclasses import dataclass

import torch


@dataclass
class PackedDocuments:
    seq_idx: torch.Tensor  # [b, s] int: document of each token
    position_ids: torch.Tensor  # [b, s] int: position of each token inside its document

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], device=None) -> "PackedDocuments":
        """Rows of documents with these lengths (each row's lengths sum to the same s)."""
        seq_idx, positions = [], []
        for row in lengths:
            seq_idx.append(torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(row)]))
            positions.append(torch.cat([torch.arange(n) for n in row]))
        return cls(torch.stack(seq_idx).to(device), torch.stack(positions).to(device))

    def attention_mask(self) -> torch.Tensor:
        """[b, 1, s, s] True where a query may attend: same document, not in the future."""
        same = self.seq_idx[:, :, None] == self.seq_idx[:, None, :]
        s = self.seq_idx.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.seq_idx.device).tril()
        return (same & causal)[:, None]


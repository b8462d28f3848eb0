"""The input embedding over a row-addressable quantized store."""

from __future__ import annotations

import torch
from torch import nn

from .int8 import Int8Linear
from .log8 import Log8Linear


class QuantizedEmbedding(nn.Module):
    """An input embedding whose table is a row-addressable quantized store (Int8Linear or Log8Linear).

    With tied embeddings the same store is also the output head, so the table is held once.

    ``scale``: a factor the replaced embedding multiplied its rows by (Gemma's ``embed_scale`` = sqrt(hidden size),
    Bart's, ...): applied as that embedding did, after rounding it to the output dtype. The output head, when
    tied, reads the store unscaled, as the original head read the unscaled table."""

    def __init__(self, store: Int8Linear | Log8Linear, out_dtype: torch.dtype, padding_idx=None, scale: float | None = None):
        super().__init__()
        self.store = store
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx
        self.scale = None if scale is None or scale == 1.0 else float(scale)
        self.num_embeddings, self.embedding_dim = store.out_features, store.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.store.rows(ids, self.out_dtype)
        if self.scale is None:
            return rows
        return rows * torch.tensor(self.scale, dtype=rows.dtype, device=rows.device)

    def extra_repr(self) -> str:
        scaled = "" if self.scale is None else f", scale={self.scale:g}"
        return f"{self.store.scheme}, {self.num_embeddings}, {self.embedding_dim}{scaled}"

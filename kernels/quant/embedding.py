"""The input embedding over a row-addressable quantized store."""

from __future__ import annotations

import torch
from torch import nn

from .int8 import Int8Linear
from .log8 import Log8Linear


class QuantizedEmbedding(nn.Module):
    """An input embedding whose table is a row-addressable quantized store (Int8Linear or Log8Linear).

    With tied embeddings the same store is also the output head, so the table is held once."""

    def __init__(self, store: Int8Linear | Log8Linear, out_dtype: torch.dtype, padding_idx=None):
        super().__init__()
        self.store = store
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = store.out_features, store.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.store.rows(ids, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.store.scheme}, {self.num_embeddings}, {self.embedding_dim}"

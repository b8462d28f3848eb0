"""A slow, obviously correct reference: per row, slice the valid keys and call PyTorch SDPA with an explicit mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    B, Hq, n, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, n, D, dtype=compute_dtype, device=q.device)
    for b, L in enumerate(seq_lens.tolist()):  # host loop: fine for a test oracle, never used in the hot path
        k = k_cache[b, :, :L].to(compute_dtype).repeat_interleave(G, dim=0)
        v = v_cache[b, :, :L].to(compute_dtype).repeat_interleave(G, dim=0)
        pos = torch.arange(L - n, L, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        allowed = torch.ones(n, L, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= pos
        if sliding_window is not None:
            allowed &= j > pos - sliding_window
        rows = allowed.any(-1)
        if L == 0 or not rows.any():
            continue
        o = F.scaled_dot_product_attention(q[b].to(compute_dtype), k, v, attn_mask=allowed, scale=scale)
        out[b] = torch.where(rows[None, :, None], o, 0)  # a query with no visible key outputs zeros
    return out.to(q.dtype)

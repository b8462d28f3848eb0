"""The CPU implementation: plain PyTorch ops, fp32 softmax and accumulation, no host synchronisation.

GQA without ``repeat_kv``: the ``G = H_q / H_kv`` query heads sharing a kv head are packed with the ``n`` queries
into one ``[G * n, D]`` matrix per kv head, so each key/value tile is read once per kv head. Long prefill chunks are
processed in query blocks so the fp32 score matrix stays bounded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCORE_BYTES = 64 * 1024 * 1024  # fp32 score-matrix budget per block of queries


def cpu_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    kv_len: int | None = None,
    exact: bool = False,
) -> torch.Tensor:
    B, Hq, n, D = q.shape
    _, Hkv, max_len, _ = k_cache.shape
    G = Hq // Hkv
    if exact and kv_len is not None and 0 < n <= kv_len <= max_len:
        return _exact_fill_attention(q, k_cache, v_cache, int(kv_len), scale, causal, sliding_window)
    # kv_len: a host-side upper bound on seq_lens (the cache knows it without a sync); keys past it are never touched.
    L = max_len if kv_len is None else max(0, min(int(kv_len), max_len))
    out = torch.empty(B, Hkv, G, n, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    if L == 0 or n == 0:
        return out.zero_().reshape(B, Hq, n, -1)

    lens = seq_lens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
    j = torch.arange(L, device=q.device).view(1, 1, 1, L)
    key_ok = j < lens  # [B, 1, 1, L]
    kf = k_cache[:, :, :L].float()  # [B, Hkv, L, D] (a view when already fp32: never written)
    # Zero the value rows past each row's fill: p == 0 there, but 0 * NaN would still poison the sum.
    vf = v_cache[:, :, :L].float().masked_fill(key_ok.view(B, 1, L, 1).logical_not(), 0.0)
    kt = kf.transpose(-1, -2)

    qg = q.reshape(B, Hkv, G, n, D)
    block = max(1, min(n, SCORE_BYTES // max(1, 4 * B * Hq * L)))
    for s in range(0, n, block):
        e = min(n, s + block)
        m = e - s
        qb = qg[:, :, :, s:e].float().reshape(B, Hkv, G * m, D)
        scores = torch.matmul(qb, kt).mul_(scale)  # [B, Hkv, G*m, L]
        scores = scores.view(B, Hkv, G, m, L)
        pos = lens - n + torch.arange(s, e, device=q.device).view(1, 1, m, 1)  # [B, 1, m, 1] absolute positions
        allowed = key_ok.expand(B, 1, m, L)
        if causal:
            allowed = allowed & (j <= pos)
        if sliding_window is not None:
            allowed = allowed & (j > pos - sliding_window)
        scores.masked_fill_(allowed.logical_not().unsqueeze(1), -math.inf)  # also overwrites NaN/inf from garbage keys
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = scores.sub_(row_max).exp_()
        denom = p.sum(-1, keepdim=True)
        o = torch.matmul(p.view(B, Hkv, G * m, L), vf).view(B, Hkv, G, m, -1)
        o = o / torch.where(denom > 0, denom, torch.ones_like(denom))  # a query that sees no key outputs zeros
        out[:, :, :, s:e] = o.to(q.dtype)
    return out.reshape(B, Hq, n, -1)


def _exact_fill_attention(q, k_cache, v_cache, L: int, scale, causal, sliding_window) -> torch.Tensor:
    """Every row is filled to exactly ``L`` (the caller knows it on the host): no key inside ``[:L]`` is garbage,
    so PyTorch's fused SDPA over the ``[:L]`` views does the work (fp32 accumulation inside, GQA without a copy).
    Query ``i`` sits at ``L - n + i``; a mask is built only for a prefill chunk (decode sees every key)."""
    n = q.shape[2]
    mask = None
    if (causal and n > 1) or sliding_window is not None:
        j = torch.arange(L, device=q.device).view(1, L)
        pos = torch.arange(L - n, L, device=q.device).view(n, 1)
        mask = (j <= pos) if causal else torch.ones(n, L, dtype=torch.bool, device=q.device)
        if sliding_window is not None:
            mask = mask & (j > pos - sliding_window)
    k, v = k_cache[:, :, :L], v_cache[:, :, :L]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

"""The Triton kernel (CUDA, or the Triton interpreter on CPU under ``TRITON_INTERPRET=1``).

Grid: ``(B * H_kv, query blocks, key splits)``. The ``G = H_q / H_kv`` query heads that share a kv head are packed
with the ``n`` queries into ``M = G * n`` rows, so GQA decode fills a tile with ``G`` rows instead of one. Decode
(small ``M``) is additionally split across the key dimension (flash-decoding): each program reduces one slice of
keys to a partial output and its log-sum-exp, and a short fp32 combine merges the slices.

Masking, per tile, by absolute position: ``j < seq_len`` (keys past the fill are not even loaded, so garbage there
cannot leak, including in a tile that straddles ``seq_len``), ``j <= pos`` (causal), ``j > pos - W`` (sliding
window). The loop bounds come from ``seq_lens`` read on the device: no host sync.

Precision: operands are upcast to fp32 in registers. fp32 inputs use exact ("ieee") dots; bf16/fp16 inputs use tf32
tensor-core dots, which represent bf16 values exactly (so q.k products are exact) and keep p at 10 mantissa bits,
better than the bf16 p of the usual flash-attention recipe. Softmax statistics and accumulators are fp32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch


@triton.jit
def _fmc_attn_kernel(
    Q, K, V, SeqLens, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, sos, som, sod,
    slb, slh, sls, slm,
    n_q, H_kv, split_size, sm_scale, window,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_kv
    hkv = pid_bh % H_kv
    seq_len = tl.load(SeqLens + b).to(tl.int32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (group, query) rows
    m_ok = offs_m < G * n_q
    g = offs_m // n_q
    qi = offs_m % n_q
    head = hkv * G + g
    pos = seq_len - n_q + qi  # absolute position of each query
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D

    q = tl.load(
        Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    q = q.to(tl.float32)

    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, seq_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi  # hi <= seq_len: the partial last tile is cut here, before any load
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(tl.float32), input_precision=PRECISION) * sm_scale
        allowed = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        O + b * sob + hkv * soh + pid_s * sos + offs_m[:, None] * som + offs_d[None, :] * sod,
        out, mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * slb + hkv * slh + pid_s * sls + offs_m * slm, lse, mask=m_ok)


def _pick_splits(kv_len: int, programs: int, block_n: int, target: int) -> int:
    tiles = max(1, triton.cdiv(kv_len, block_n))
    return max(1, min(tiles, triton.cdiv(target, max(1, programs))))


def triton_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    kv_len: int | None = None,
    block_m: int = 16,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    B, Hq, n, D = q.shape
    _, Hkv, max_len, _ = k_cache.shape
    G = Hq // Hkv
    M = G * n
    L = max_len if kv_len is None else max(1, min(int(kv_len), max_len))  # host bound only: no sync
    block_d = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    m_blocks = triton.cdiv(M, block_m)
    if num_splits is None:
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = _pick_splits(L, B * Hkv * m_blocks, block_n, target)
    split_size = triton.cdiv(triton.cdiv(L, num_splits), block_n) * block_n
    num_splits = triton.cdiv(L, split_size)

    o_part = torch.empty(B, Hkv, num_splits, M, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hkv, num_splits, M, dtype=torch.float32, device=q.device)
    grid = (B * Hkv, m_blocks, num_splits)
    _fmc_attn_kernel[grid](
        q, k_cache, v_cache, seq_lens, o_part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o_part.stride(), *lse.stride(),
        n, Hkv, split_size, float(scale), int(sliding_window or 0),
        G=G, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if num_splits == 1:
        out = o_part[:, :, 0]
    else:  # merge the key splits in fp32 by their log-sum-exp
        top = lse.amax(2, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(lse - top)  # [B, Hkv, S, M]; an empty split has weight 0
        den = w.sum(2)
        out = (o_part * w.unsqueeze(-1)).sum(2) / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)
    return out.view(B, Hkv, G, n, D).reshape(B, Hq, n, D).to(q.dtype)

"""Weight products written for inductor to fuse (one row: a decode step; each weight is read once), and the
decoding of int4's packed CPU layout (for the dequantizing prefill).

Which of these a layer really uses is decided by measuring on the machine (``select.py``): ``float_gemv`` consults
that choice itself, because the compiled step (fmchat's ``DecodeLinear``) calls it for every bf16/fp16 one-row
product."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import choices


def float_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[1, K]`` times a bf16/fp16 ``w`` ``[N, K]`` (+ ``bias``), for tracing under ``torch.compile``.

    With the measured choice ``fused`` (the default): one fused loop that reads each weight once and accumulates in
    fp32 (on the 2-core AVX-512 CPU of docs/decode.md it streams a whole model's bf16 weights at ~29 GB/s, against
    ~11 GB/s for the prepacked oneDNN linear at one row). With ``linear``: ``F.linear``, which inductor lowers to
    the (prepacked) library GEMM, for a CPU where that is faster (docs/quant.md, "Kernel selection")."""
    if not torch.compiler.is_dynamo_compiling() or choices.one_row("bf16", compiled=True) == "linear":
        # Not inside a trace: an eager call (``torch.compiler.is_compiling()``, which callers check, is true in every
        # thread while any thread compiles) gets the library GEMV, not the fused loop's fp32 temporaries.
        return F.linear(x, w, bias).reshape(1, -1)
    return fused_float_gemv(x, w, bias)


def fused_float_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused loop of ``float_gemv``, whatever the choice (measured as the candidate ``fused``)."""
    y = (x.float() * w.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(1, -1)


def mm_weight_chunks(x2: torch.Tensor, n: int, chunk_rows: int, dtype: torch.dtype, weight_rows) -> torch.Tensor:
    """``x2 @ W.T`` for a weight of ``n`` rows stored in some other form: ``weight_rows(rows, xd)`` returns the
    product of ``xd`` (``x2`` in ``dtype``) with the rows ``rows`` (a slice) made float; ``chunk_rows`` rows at a
    time (0: all), so the temporary is one chunk; the result in ``x2``'s dtype. The loop of every chunked prefill
    product (bf16 cast to fp32, int8 and int4 codes made float)."""
    xd = x2.to(dtype)
    step = chunk_rows if 0 < chunk_rows < n else n
    outs = [weight_rows(slice(i, min(i + step, n)), xd).to(x2.dtype) for i in range(0, n, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def float_mm_chunks(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, chunk_rows: int = 0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """``x2 @ w.T (+ bias)`` for a bf16 ``w`` through the GEMM of ``dtype``: ``chunk_rows`` weight rows (0: all) cast at
    a time (the temporary is one chunk), the result in ``x2``'s dtype. The candidate ``fp32`` of bf16 prefill: on a
    CPU without bf16 GEMM instructions (AVX2) the bf16 GEMM runs ~4x slower than this (docs/quant.md)."""
    return mm_weight_chunks(x2, w.shape[0], chunk_rows, dtype, lambda rows, xd: F.linear(
        xd, w[rows].to(dtype), None if bias is None else bias[rows].to(dtype)))


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An eager ``nn.Linear`` product of a bf16 weight with the measured prefill path (``choices.prefill_plan("bf16",
    rows)``): the bf16 GEMM (``F.linear``), or, from the measured number of rows on, ``float_mm_chunks``."""
    if w.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 2:
        rows = x.numel() // x.shape[-1]
        plan = choices.prefill_plan("bf16", rows) if rows > 1 else None
        if plan is not None:
            chunk, dtype = plan
            return float_mm_chunks(x.reshape(rows, -1), w, bias, chunk, dtype).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, K]`` times int8 ``w`` ``[N, K]`` with per-row ``scales``, for tracing under ``torch.compile``.

    Written as a broadcast product and a sum so that inductor emits one loop nest that reads each int8 weight
    once, converts it in registers and accumulates in fp32 (no dequantized copy). For one row this streams the
    weights from memory ~1.9x faster than ``_weight_int8pack_mm`` on the 2-core AVX-512 CPU of docs/decode.md, and
    far slower on an AVX2-only one (docs/quant.md): ``Int8Linear`` uses it only where it was measured fastest.
    """
    return ((x.float() * w.float()).sum(-1) * scales.float()).to(x.dtype).reshape(1, -1)


def int4_cpu_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The 4-bit codes ``[N, K]`` (uint8, 0..15) of ``torch._convert_weight_to_int4pack_for_cpu``'s output
    ``packed`` ``[N, K/2]``, for a slice of whole blocks plus at most one tail (what ``Int4Linear`` stores: chunks of
    64-row multiples).

    The layout, as read back from the converter: rows go in blocks of ``B`` (``int4_cpu_block()``: 64 where torch's
    CPU capability is AVX-512, 32 with AVX2 — the converter packs for the kernel of the running ISA); a block's
    ``B * K / 2`` bytes are ``K`` runs of ``B / 2`` bytes, run ``k`` holding column ``k`` of the block's rows ``j``
    (low nibble) and ``B / 2 + j`` (high nibble). A last block of ``t < B`` rows (a multiple of 16) is ``K`` runs of
    ``t / 2`` bytes, byte ``j`` holding rows ``2j`` (low) and ``2j + 1`` (high). ``tests/test_kernel_select.py``
    checks this against the converter."""
    return _int4_codes(packed, k, int4_cpu_block())


def _int4_codes(packed: torch.Tensor, k: int, block: int) -> torch.Tensor:
    n = packed.shape[0]
    full = n // block * block
    parts = []
    if full:
        b = packed[:full].reshape(full // block, k, block // 2)
        parts.append(torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(full, k))
    if full < n:
        t = packed[full:].reshape(k, (n - full) // 2)
        parts.append(torch.stack([t & 15, t >> 4], dim=2).reshape(k, n - full).t())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@functools.cache
def int4_cpu_block() -> int:
    """Rows per block of this process's int4 CPU packing, read off the converter itself (one 128x32 probe): the
    block size whose decoding gives the probe back. Raises where none does (a torch with a layout not known here)."""
    q = torch.randint(0, 16, (128 + 16, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32):
        if torch.equal(_int4_codes(packed, 32, block).int(), q):
            return block
    raise RuntimeError("torch's int4 CPU packing has a layout fmchat does not know")


def int4_dequant(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(code - 8) * scale + zero`` per group, as ``dtype`` ``[N, K]`` (computed in fp32). ``scales_zeros``:
    ``[K / group_size, N, 2]`` for the same rows as ``codes``."""
    n, k = codes.shape
    sz = scales_zeros.float()
    scale = sz[..., 0].t().reshape(n, k // group_size, 1)
    zero = sz[..., 1].t().reshape(n, k // group_size, 1)
    w = (codes.reshape(n, k // group_size, group_size).float() - 8.0) * scale + zero
    return w.reshape(n, k).to(dtype)

"""One-row weight products (a decode step) written for inductor to fuse: each weight is read once."""

from __future__ import annotations

import torch


def float_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[1, K]`` times a bf16/fp16 ``w`` ``[N, K]`` (+ ``bias``), for tracing under ``torch.compile``: one
    fused loop that reads each weight once and accumulates in fp32. On the 2-core CPU of docs/decode.md it streams
    a whole model's bf16 weights at ~29 GB/s, against ~11 GB/s for the prepacked oneDNN linear at one row."""
    y = (x.float() * w.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(1, -1)


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, K]`` times int8 ``w`` ``[N, K]`` with per-row ``scales``, for tracing under ``torch.compile``.

    Written as a broadcast product and a sum so that inductor emits one loop nest that reads each int8 weight
    once, converts it in registers and accumulates in fp32 (no dequantized copy). For one row this streams the
    weights from memory ~1.9x faster than ``_weight_int8pack_mm`` on the 2-core CPU of docs/decode.md.
    """
    return ((x.float() * w.float()).sum(-1) * scales.float()).to(x.dtype).reshape(1, -1)

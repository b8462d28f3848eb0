"""Decode attention written for ``torch.compile`` on CPU: one query token over the filled rows of a cache.

``decode_attention_fused`` is plain PyTorch (broadcasts, ``softmax``, sums): eagerly it is slow (it materializes
``[H_q, L, D]`` fp32 products), but traced by inductor it becomes a few fused loops that read each cached K/V row
once per query head, convert it to fp32 in registers, and never build a mask or a copy of the cache. The fill
length may be a symbolic size (``torch.compile(dynamic=True)``), so one compiled kernel serves every length and
its work grows with the fill, not with the buffer. fmchat's compiled decode step (``--compile on``) traces it
inside the whole model's graph; ``fmchat bench kernels`` also times it compiled on its own.
"""

from __future__ import annotations

import torch
from torch._prims_common import make_contiguous_strides_for  # (loaded with torch already)


_FORCE_STRIDE_ORDER = None  # prims.inductor_force_stride_order, once ``prepare_compile()`` has registered it


def prepare_compile() -> None:
    """Call before tracing ``decode_attention_fused`` for inductor (torch.compile, torch.export + AOTInductor):
    registers the op ``_realized_fp32`` traces to (an import of inductor, which the compile needs anyway; tracing
    code cannot import)."""
    global _FORCE_STRIDE_ORDER
    import torch._inductor.inductor_prims  # noqa: F401

    _FORCE_STRIDE_ORDER = torch.ops.prims.inductor_force_stride_order


def _realized_fp32(q: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``q`` that inductor computes once into a buffer. Without it inductor inlines the query's
    producers (RoPE: cos, sin) into the score loop and recomputes them for every cached key. Traced, the copy goes
    through ``prims.inductor_force_stride_order``, which inductor lowers by realizing its input in C++: the custom
    op this replaces was opaque to inductor too, but ran as a Python callback once per layer and token (in an
    AOTInductor program, through its proxy executor): 0.4-0.5 ms of a 11.7 ms SmolLM2-135M step (docs/decode.md).
    Not prepared (or eagerly), a plain copy."""
    if _FORCE_STRIDE_ORDER is not None and torch.compiler.is_compiling():
        return _FORCE_STRIDE_ORDER(q.float(), list(make_contiguous_strides_for(q.shape)))
    return q.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def decode_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[1, H_q, 1, D]`` (one token, one row); ``k``/``v`` ``[H_kv, L, D]``: the ``L`` keys this token attends
    to (the filled rows of one batch row, any dtype). Returns ``[1, 1, H_q, D]`` in ``q``'s dtype.

    No mask: a decoded token sees every filled key (the caller slices the rows: fill, sliding window). GQA through
    an expanded view (query head ``h`` reads kv head ``h // (H_q / H_kv)``), no ``repeat_kv`` copy. Products,
    softmax and sums in fp32.
    """
    Hq, D = q.shape[1], q.shape[-1]
    Hkv, L, Dv = k.shape[0], k.shape[1], v.shape[-1]
    G = Hq // Hkv
    qh = _realized_fp32(q).reshape(Hq, 1, D)
    kh = k.unsqueeze(1).expand(Hkv, G, L, D).reshape(Hq, L, D)
    vh = v.unsqueeze(1).expand(Hkv, G, L, Dv).reshape(Hq, L, Dv)
    scores = (qh * kh.float()).sum(-1) * scale  # [H_q, L]
    probs = torch.softmax(scores, dim=-1)
    out = (probs.unsqueeze(-1) * vh.float()).sum(1)  # [H_q, Dv]
    return out.to(q.dtype).reshape(1, 1, Hq, Dv)

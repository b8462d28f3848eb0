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


@torch.library.custom_op("kernels_attention::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``x``, opaque to inductor, so that ``x`` is computed once into a buffer. Without it inductor
    inlines the query's producers (RoPE: cos, sin) into the score loop and recomputes them for every cached key."""
    return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


@materialize.register_fake
def _(x):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


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
    qh = materialize(q).reshape(Hq, 1, D)
    kh = k.unsqueeze(1).expand(Hkv, G, L, D).reshape(Hq, L, D)
    vh = v.unsqueeze(1).expand(Hkv, G, L, Dv).reshape(Hq, L, Dv)
    scores = (qh * kh.float()).sum(-1) * scale  # [H_q, L]
    probs = torch.softmax(scores, dim=-1)
    out = (probs.unsqueeze(-1) * vh.float()).sum(1)  # [H_q, Dv]
    return out.to(q.dtype).reshape(1, 1, Hq, Dv)

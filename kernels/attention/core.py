"""One API over the two implementations (CPU PyTorch ops; Triton on CUDA or under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import importlib.util
import os

import torch

from .cpu import cpu_attention


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(q, k_cache, v_cache, seq_lens) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("q, k_cache, v_cache must be 4-D: [B, H, len, D]")
    B, Hq, _, D = q.shape
    if k_cache.shape[0] != B or v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[-1] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if Hq % k_cache.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k_cache.shape[1]})")
    if seq_lens.shape != (B,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("seq_lens must be an int32 tensor of shape [B]")


def fmc_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    kv_len: int | None = None,
    impl: str = "auto",
    exact: bool = False,
    **triton_options,
) -> torch.Tensor:
    """Attention of ``q`` ``[B, H_q, n, D]`` over the first ``seq_lens[b]`` positions of the caches. Returns
    ``[B, H_q, n, D]`` in ``q``'s dtype.

    The ``n`` queries are the *last* ``n`` filled positions of each row (``append_kv`` them first), so the same call
    serves decode (``n == 1``), a first prefill and a prefill chunk after an existing cache.
    ``kv_len``: optional host-side upper bound on ``seq_lens`` (e.g. tracked by the cache) that lets the kernel skip
    the unfilled tail without reading ``seq_lens`` on the host. ``exact=True`` promises every row is filled to
    exactly ``kv_len`` (a batch of one, say): the CPU path then runs PyTorch's fused SDPA on the filled views. ``impl``: ``auto`` (Triton on CUDA, else CPU), ``cpu``
    or ``triton``.
    """
    _check(q, k_cache, v_cache, seq_lens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton_available() else "cpu"
    if impl == "cpu":
        return cpu_attention(q, k_cache, v_cache, seq_lens, scale=scale, causal=causal, sliding_window=sliding_window,
                             kv_len=kv_len, exact=exact)  # fmt: skip
    if impl == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton kernel needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported")
        from .triton_kernel import triton_attention

        return triton_attention(
            q, k_cache, v_cache, seq_lens, scale=scale, causal=causal, sliding_window=sliding_window, kv_len=kv_len, **triton_options
        )
    raise ValueError(f"unknown attention impl '{impl}' (auto, cpu or triton)")


def append_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Write ``k_new``/``v_new`` ``[B, H_kv, n, D]`` at positions ``seq_lens[b] .. seq_lens[b] + n - 1`` of each row,
    in place, then advance ``seq_lens`` by ``n`` in place. No host synchronisation: positions are computed on the
    device. The caller guarantees ``seq_lens + n <= max_len`` (the cache checks it against its host-side count).
    Returns ``seq_lens``.
    """
    B, H, n, D = k_new.shape
    if n == 0:
        return seq_lens
    idx = seq_lens.to(torch.long).view(B, 1, 1, 1) + torch.arange(n, device=k_cache.device).view(1, 1, n, 1)
    k_cache.scatter_(2, idx.expand(B, H, n, D), k_new.to(k_cache.dtype))
    v_cache.scatter_(2, idx.expand(B, H, n, v_new.shape[-1]), v_new.to(v_cache.dtype))
    seq_lens.add_(n)
    return seq_lens

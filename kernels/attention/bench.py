"""Decode-attention timings: fmc (CPU path or Triton) against PyTorch SDPA over an exact-length cache.

``decode_attention_bench()`` returns plain rows (dicts) for a CLI or a report to print; ``format_table`` renders
them. One "call" is one layer's attention for one decoded token (B rows, all heads). SDPA gets the K/V already cut
to the context length (what a growing DynamicCache hands it); fmc reads the same prefix of a buffer preallocated to
the largest length, with the fill passed as ``seq_lens``.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from .core import fmc_attention
from .fused import decode_attention_fused


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1000 / iters


@functools.cache
def _fused():
    """``decode_attention_fused`` compiled once per process, with a symbolic length."""
    from .fused import prepare_compile

    prepare_compile()
    return torch.compile(decode_attention_fused, dynamic=True)


def decode_attention_bench(
    context_lengths=(256, 1024, 4096),
    *,
    batch: int = 1,
    q_heads: int = 15,
    kv_heads: int = 5,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    impls: tuple[str, ...] | None = None,
    extra: dict | None = None,
    warmup: int = 3,
    iters: int = 20,
    seed: int = 0,
) -> list[dict]:
    """Milliseconds per decode-attention call at each context length, per implementation.

    ``impls``: names among ``sdpa`` (torch SDPA, GQA), ``fmc`` (``impl="auto"``: Triton on CUDA, CPU path on CPU),
    ``fmc-exact`` (the CPU path told every row is filled to the same host-known length, as a chat's batch of one
    is), ``fmc-cpu``, ``fmc-triton``, and ``fmc-fused`` (``decode_attention_fused`` under ``torch.compile`` with
    a symbolic length, over the filled rows; B = 1; the time includes Dynamo's per-call overhead, which the
    compiled decode step does not pay). Default: ``sdpa`` and ``fmc``. ``extra``: more rows, name -> ``fn(q,
    k_exact, v_exact)`` returning ``[B, H_q, 1, D]``. Also reports the largest absolute difference from SDPA.
    """
    device = torch.device(device)
    impls = impls or ("sdpa", "fmc")
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_len = max(context_lengths)
    k_buf = torch.randn(batch, kv_heads, max_len, head_dim, generator=g).to(device=device, dtype=dtype)
    v_buf = torch.randn(batch, kv_heads, max_len, head_dim, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(batch, q_heads, 1, head_dim, generator=g).to(device=device, dtype=dtype)
    rows = []
    for L in context_lengths:
        k_exact = k_buf[:, :, :L].contiguous()
        v_exact = v_buf[:, :, :L].contiguous()
        lens = torch.full((batch,), L, dtype=torch.int32, device=device)
        ref = F.scaled_dot_product_attention(q, k_exact, v_exact, enable_gqa=True)
        for name in list(impls) + list(extra or {}):
            if name == "sdpa":
                fn = lambda: F.scaled_dot_product_attention(q, k_exact, v_exact, enable_gqa=True)  # noqa: E731
            elif extra and name in extra:
                fn = lambda f=extra[name]: f(q, k_exact, v_exact)  # noqa: E731
            elif name == "fmc-fused":
                fused = _fused()
                fn = lambda L=L: fused(q, k_buf[0, :, :L], v_buf[0, :, :L], head_dim**-0.5).transpose(1, 2)  # noqa: E731
            elif name == "fmc-exact":
                fn = lambda L=L: fmc_attention(q, k_buf, v_buf, lens, kv_len=L, impl="cpu", exact=True)  # noqa: E731
            else:
                impl = {"fmc": "auto", "fmc-cpu": "cpu", "fmc-triton": "triton"}[name]
                fn = lambda impl=impl: fmc_attention(q, k_buf, v_buf, lens, kv_len=L, impl=impl)  # noqa: E731
            ms = _time(fn, device, warmup, iters)
            err = (fn().float() - ref.float()).abs().max().item() if name != "sdpa" else 0.0
            kv_read = 2 * batch * kv_heads * L * head_dim * k_buf.element_size()
            rows.append(
                dict(impl=name, ctx=L, ms=ms, gb_s=kv_read / (ms * 1e6), max_abs_diff=err, device=str(device),
                     dtype=str(dtype).removeprefix("torch."), batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
            )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'impl':<11} {'ctx':>7} {'ms/call':>9} {'KV GB/s':>8} {'max|diff|':>10}"]
    for r in rows:
        lines.append(f"{r['impl']:<11} {r['ctx']:>7} {r['ms']:>9.4f} {r['gb_s']:>8.2f} {r['max_abs_diff']:>10.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(decode_attention_bench()))

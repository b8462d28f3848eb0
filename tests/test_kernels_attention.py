"""fmchat_kernels.attention (the kernels/ folder): the CPU path and the Triton kernel against an SDPA reference.

The Triton cases run on CUDA when present, otherwise in the Triton interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, hence at the top of this module; the shapes stay small for it).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

# The interpreter must be chosen before triton is first imported: tests/conftest.py sets TRITON_INTERPRET=1
# (on machines without CUDA) before anything is imported.
from fmchat_kernels.attention import append_kv, fmc_attention, reference_attention, triton_available  # noqa: E402
from fmchat_kernels.attention import cpu as cpu_mod  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)  # bf16 inputs/outputs (8-bit mantissa); softmax and sums are fp32 inside

IMPLS = [
    "cpu",
    pytest.param(
        "triton",
        marks=[
            pytest.mark.skipif(not triton_available(), reason="triton not installed"),
        ],
    ),
]
# Small tiles under the interpreter so short sequences still span several tiles and splits.
TRITON_OPTS = dict(block_n=16, num_splits=3)


def run(impl, q, k, v, lens, *, shipped=False, **kw):
    """``shipped``: the Triton kernel at its own launch settings (tile width, key splits), as the chat calls it;
    otherwise with TRITON_OPTS' small tiles and forced splits."""
    if impl == "triton":
        kw = kw if shipped else {**TRITON_OPTS, **kw}
        if DEV == "cpu":
            assert os.environ.get("TRITON_INTERPRET") == "1"
    return fmc_attention(q, k, v, lens, impl=impl, **kw)


def make_case(prev, n, *, hq=4, hkv=2, d=16, max_len=64, dtype=torch.float32, garbage="nan", seed=0):
    """Caches whose first prev[b] positions hold real K/V and whose tail holds garbage; then n new tokens appended
    in place. Returns q, k_cache, v_cache, seq_lens (after the append)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prev)
    fill = {"nan": float("nan"), "huge": 1e30, "inf": float("inf"), "zero": 0.0}[garbage]
    k = torch.full((B, hkv, max_len, d), fill, dtype=dtype)
    v = torch.full((B, hkv, max_len, d), -fill if garbage != "nan" else fill, dtype=dtype)
    for b, p in enumerate(prev):
        k[b, :, :p] = torch.randn(hkv, p, d, generator=g).to(dtype)
        v[b, :, :p] = torch.randn(hkv, p, d, generator=g).to(dtype)
    lens = torch.tensor(prev, dtype=torch.int32)
    k_new = torch.randn(B, hkv, n, d, generator=g).to(dtype)
    v_new = torch.randn(B, hkv, n, d, generator=g).to(dtype)
    q = torch.randn(B, hq, n, d, generator=g).to(dtype)
    k, v, lens, k_new, v_new, q = (t.to(DEV) for t in (k, v, lens, k_new, v_new, q))
    append_kv(k, v, k_new, v_new, lens)
    return q, k, v, lens


CASES = {
    # name: (prev fills per row, new tokens)
    "decode": ([37], 1),
    "decode-ragged": ([0, 15, 16, 33], 1),  # 1, 16, 17, 34 keys: partial, exact and one-past tiles
    "prefill": ([0], 19),
    "prefill-ragged": ([0, 0], 5),
    "prefill-after-cache": ([13], 7),
    "prefill-after-cache-ragged": ([13, 29, 0], 6),
    "tile-edge": ([31], 1),  # 32 keys: exactly two 16-wide tiles
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(impl, case):
    prev, n = CASES[case]
    q, k, v, lens = make_case(prev, n)
    out = run(impl, q, k, v, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_attention(q, k, v, lens), **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])  # GQA ratios 1, 2, 4, 8
@pytest.mark.parametrize("n", [1, 5])
def test_gqa_ratios(impl, hq, hkv, n):
    q, k, v, lens = make_case([9, 20], n, hq=hq, hkv=hkv)
    torch.testing.assert_close(run(impl, q, k, v, lens), reference_attention(q, k, v, lens), **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_against_sdpa_full_rows(impl):
    """Rows filled to the same length: the result equals SDPA (lower-right causal) over the filled prefix."""
    prev, n = [21, 21], 6
    q, k, v, lens = make_case(prev, n, hq=8, hkv=2)
    L = prev[0] + n
    pos = torch.arange(L - n, L, device=DEV)[:, None]
    mask = torch.arange(L, device=DEV)[None, :] <= pos
    want = F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(run(impl, q, k, v, lens), want, **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("garbage", ["huge", "inf", "zero"])
def test_garbage_beyond_seq_len_never_leaks(impl, garbage):
    """Whatever sits past seq_len (NaN, inf, 1e30, stale values) gives bit-identical output."""
    prev, n = [3, 17, 30], 2
    base = run(impl, *make_case(prev, n, garbage="nan"))
    assert torch.isfinite(base).all()
    other = run(impl, *make_case(prev, n, garbage=garbage))
    assert torch.equal(base, other)


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_len_hint_and_odd_head_dim(impl):
    """A host-side kv_len bound gives the same answer as scanning the whole buffer; head dim 24 pads the tile."""
    q, k, v, lens = make_case([10, 25], 3, d=24)
    full = run(impl, q, k, v, lens)
    bounded = run(impl, q, k, v, lens, kv_len=28)
    torch.testing.assert_close(full, reference_attention(q, k, v, lens), **FP32_TOL)
    torch.testing.assert_close(bounded, full, **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [1, 4, 9])
def test_sliding_window(impl, window):
    q, k, v, lens = make_case([12, 0], 5)
    torch.testing.assert_close(
        run(impl, q, k, v, lens, sliding_window=window), reference_attention(q, k, v, lens, sliding_window=window), **FP32_TOL
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    q, k, v, lens = make_case([11, 40], 3, dtype=torch.bfloat16, hq=8, hkv=2)
    out = run(impl, q, k, v, lens)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q, k, v, lens)  # fp64 math on the same bf16 inputs
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)


def test_cpu_query_blocks(monkeypatch):
    """A long prefill chunk is processed in query blocks; the blocking must not change the result."""
    q, k, v, lens = make_case([7, 20], 23)
    whole = fmc_attention(q, k, v, lens, impl="cpu")
    monkeypatch.setattr(cpu_mod, "SCORE_BYTES", 4 * 2 * 4 * 64 * 3)  # 3 queries per block
    blocked = fmc_attention(q, k, v, lens, impl="cpu")
    torch.testing.assert_close(blocked, whole, **FP32_TOL)
    torch.testing.assert_close(blocked, reference_attention(q, k, v, lens), **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_incremental_decode_matches_one_prefill(impl):
    """Prefill 9 tokens then decode 4 one at a time == attention of the whole 13-token prompt, row by row."""
    g = torch.Generator().manual_seed(3)
    B, H, D, T = 2, 2, 16, 13
    ks, vs, qs = (torch.randn(B, H, T, D, generator=g).to(DEV) for _ in range(3))
    k = torch.full((B, H, 32, D), float("nan"), device=DEV)
    v = torch.full((B, H, 32, D), float("nan"), device=DEV)
    lens = torch.zeros(B, dtype=torch.int32, device=DEV)
    append_kv(k, v, ks[:, :, :9], vs[:, :, :9], lens)
    outs = [run(impl, qs[:, :, :9], k, v, lens)]
    for t in range(9, T):
        append_kv(k, v, ks[:, :, t : t + 1], vs[:, :, t : t + 1], lens)
        outs.append(run(impl, qs[:, :, t : t + 1], k, v, lens))
    assert lens.tolist() == [T, T]
    want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, **FP32_TOL)


def test_append_kv_writes_in_place_per_row():
    k = torch.zeros(3, 1, 8, 2)
    v = torch.zeros(3, 1, 8, 2)
    lens = torch.tensor([0, 2, 5], dtype=torch.int32)
    k_ptr = k.data_ptr()
    new = torch.arange(1, 3 * 2 * 2 + 1, dtype=torch.float32).view(3, 1, 2, 2)
    append_kv(k, v, new, -new, lens)
    assert k.data_ptr() == k_ptr and lens.tolist() == [2, 4, 7]
    for b, start in enumerate([0, 2, 5]):
        assert torch.equal(k[b, 0, start : start + 2], new[b, 0])
        assert torch.equal(v[b, 0, start : start + 2], -new[b, 0])
        untouched = [i for i in range(8) if not start <= i < start + 2]
        assert (k[b, 0, untouched] == 0).all()


def test_rejects_bad_shapes():
    q, k, v, lens = make_case([4], 1, hq=4, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        fmc_attention(q[:, :3], k, v, lens)
    with pytest.raises(ValueError, match="seq_lens"):
        fmc_attention(q, k, v, lens.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    q, k, v, lens = make_case([40], 1)
    new = torch.randn(1, 2, 1, 16, device="cuda")
    fmc_attention(q, k, v, lens, kv_len=64)  # compile the kernel first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        append_kv(k, v, new, new, lens)
        fmc_attention(q, k, v, lens, kv_len=64)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_decode_attention_bench_rows():
    from fmchat_kernels.attention.bench import decode_attention_bench, format_table

    rows = decode_attention_bench((16, 40), q_heads=4, kv_heads=2, head_dim=16, warmup=0, iters=1)
    assert [(r["impl"], r["ctx"]) for r in rows] == [("sdpa", 16), ("fmc", 16), ("sdpa", 40), ("fmc", 40)]
    assert all(r["ms"] > 0 and r["max_abs_diff"] < 1e-5 for r in rows)
    assert "fmc" in format_table(rows)


@pytest.mark.parametrize("prev,n", [([37], 1), ([13], 7), ([0], 19), ([20, 20], 3)])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_exact_fill_path_matches_reference(prev, n, hq, hkv, window):
    """exact=True (every row filled to kv_len, known on the host) takes PyTorch's fused SDPA on the filled views:
    same results as the general path and the reference, garbage past the fill never read."""
    q, k, v, lens = make_case(prev, n, hq=hq, hkv=hkv, garbage="nan")
    L = prev[0] + n
    fast = fmc_attention(q, k, v, lens, impl="cpu", kv_len=L, exact=True, sliding_window=window)
    general = fmc_attention(q, k, v, lens, impl="cpu", kv_len=L, sliding_window=window)
    want = reference_attention(q, k, v, lens, sliding_window=window)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, want, **FP32_TOL)
    torch.testing.assert_close(fast, general, **FP32_TOL)


def test_cpu_exact_fill_path_in_bf16():
    q, k, v, lens = make_case([30], 4, hq=4, hkv=2, dtype=torch.bfloat16)
    fast = fmc_attention(q, k, v, lens, impl="cpu", kv_len=34, exact=True)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference_attention(q, k, v, lens).float(), **BF16_TOL)


# ------------------------------------------------------------------ the fused decode loop (compiled step's kernel)
@pytest.fixture(scope="module")
def fused_compiled():
    from fmchat_kernels.attention import decode_attention_fused

    return torch.compile(decode_attention_fused, dynamic=True)  # one kernel for every length, as in the step


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (9, 3, 96), (16, 2, 128)])  # GQA ratios 1, 3, 8; head dims 64, 96, 128
def test_fused_decode_attention_matches_reference(fused_compiled, dtype, tol, hq, hkv, d):
    """decode_attention_fused, compiled with a symbolic length and run eagerly, against the float64 reference for
    one decoded token over the first L rows of a buffer whose tail holds garbage: lengths ending mid-vector, at a
    vector edge, one past it, and long; fp32 <= 1e-5, bf16 <= 2e-2."""
    from fmchat_kernels.attention import decode_attention_fused

    g = torch.Generator().manual_seed(hq * 100 + d)
    max_len = 1024
    k_buf = torch.randn(1, hkv, max_len, d, generator=g).to(dtype)
    v_buf = torch.randn(1, hkv, max_len, d, generator=g).to(dtype)
    for L in (1, 7, 63, 64, 65, 100, 1000, max_len):
        k_buf[:, :, L:] = float("nan")  # never read: the caller passes the filled rows only
        q = torch.randn(1, hq, 1, d, generator=g).to(dtype)
        lens = torch.tensor([L], dtype=torch.int32)
        ref = reference_attention(q, k_buf, v_buf, lens)  # [1, Hq, 1, D]
        want = ref.transpose(1, 2)  # [1, 1, Hq, D]
        for fn in (fused_compiled, decode_attention_fused):
            got = fn(q, k_buf[0, :, :L], v_buf[0, :, :L], d**-0.5)
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), **tol)
        k_buf[:, :, L:] = torch.randn(1, hkv, max_len - L, d, generator=g).to(dtype)


# ------------------------------------------------------------------ the grid, at real head dims and lengths
SPEC_LENGTHS = [1, 7, 63, 64, 65, 100, 1000, 1024]  # 1024 = the whole buffer (a full cache)
SPEC_MAX = 1024


def _spec_rows(lengths, n):
    """Fills after appending n tokens -> fills before (a length shorter than n is a first prefill of that length)."""
    return [max(0, L - n) for L in lengths], min(n, min(lengths))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (16, 2)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_spec_grid(impl, dtype, tol, hq, hkv, d):
    """Both implementations: decode (n=1) and prefill-after-cache (n=7), B=1 at every length incl. a full cache
    (and, on CPU, the exact-fill path too) and B=3 with different seq_lens, against the fp64 reference; NaN
    garbage past each fill. The Triton kernel runs at its shipped launch settings here (CASES above force small
    tiles and several key splits). Under the Triton interpreter the long B=1 rows are left out (1000 and 1024 keys
    still run inside the B=3 rows) to keep CI minutes down."""
    lengths = SPEC_LENGTHS if impl == "cpu" or DEV == "cuda" else [L for L in SPEC_LENGTHS if L < 1000]
    for n in (1, 7):
        for L in lengths:
            prev, m = _spec_rows([L], n)
            q, k, v, lens = make_case(prev, m, hq=hq, hkv=hkv, d=d, max_len=SPEC_MAX, dtype=dtype, seed=L)
            ref = reference_attention(q, k, v, lens)
            torch.testing.assert_close(run(impl, q, k, v, lens, shipped=True), ref, **tol)
            if impl == "cpu":
                exact = fmc_attention(q, k, v, lens, impl="cpu", kv_len=L, exact=True)
                torch.testing.assert_close(exact, ref, **tol)
        for rows in ([1, 100, 1000], [63, 64, 65], [7, 1024, 64]):
            prev, m = _spec_rows(rows, n)
            q, k, v, lens = make_case(prev, m, hq=hq, hkv=hkv, d=d, max_len=SPEC_MAX, dtype=dtype, seed=sum(rows))
            torch.testing.assert_close(run(impl, q, k, v, lens, kv_len=max(rows), shipped=True), reference_attention(q, k, v, lens), **tol)

"""kernels/quant/native.py: the hand-written one-row int8 kernels (csrc/int8_gemv_cpu.cpp), built with the system
compiler at first use and cached. Their results against references written in torch (the same block quantization of
the activations for ``q8``), every ISA this CPU has, the build's cache and its failures (a reason, never a crash),
and the kernels inside the ahead-of-time decode step of a real load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import compile_recording_graphs

from fmchat_kernels import quant as kq
from fmchat_kernels.quant import native, select


@pytest.fixture(autouse=True)
def _defaults():
    select.reset()
    yield
    select.reset()


@pytest.fixture(scope="module")
def loaded():
    # x86-64 with a C++ compiler, as this machine and CI are: the kernels must build here, not be skipped
    assert native.load(), native.status()
    return native


def _isas():
    return [native.ISA_AVX2] + ([native.ISA_AVX512_VNNI] if torch.ops.kernels_quant_cpu.isa_available(native.ISA_AVX512_VNNI) else [])


def _q8_reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8 activations in torch: blocks of 32, scale max|x| / 127, codes rounded to nearest even; each
    block's integer dot product scaled by its block scale; the last K % 32 columns in fp32; the row scale last."""
    xf = x.float().reshape(-1)
    k = xf.numel()
    nb = k // 32
    blocks = xf[: nb * 32].reshape(nb, 32)
    d = blocks.abs().amax(dim=1) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))[:, None])
    dots = (w[:, : nb * 32].double().reshape(w.shape[0], nb, 32) * q.double()).sum(-1)  # exact integers
    y = (dots * d.double()).sum(-1) + w[:, nb * 32 :].double() @ xf[nb * 32 :].double()
    return (y * s.double()).reshape(1, -1)


def _q8_bound(x, w, s):
    xf = x.float().reshape(-1)
    nb = xf.numel() // 32
    half_step = torch.zeros_like(xf, dtype=torch.float64)
    half_step[: nb * 32] = (xf[: nb * 32].reshape(nb, 32).abs().amax(dim=1).double() / 127 / 2).repeat_interleave(32)
    return ((w.double().abs() @ half_step) * s.double()).reshape(1, -1)


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (7, 70), (13, 96), (5, 8), (66, 640), (3, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q8_and_f32_match_their_references_on_every_isa(loaded, dtype):
    """Shapes with a partial group of 4 rows, a K that is no multiple of 32 (a tail in fp32) or of 64 (an odd block
    for VNNI, which takes two at a time), and the default model's own shapes."""
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g) * 0.01 + 1e-4
        x = (torch.randn(1, k, generator=g) * 3).to(dtype)
        x[0, 0] = 0  # a zero and a whole zero block
        if k >= 64:
            x[0, 32:64] = 0
        exact = (x.double() @ w.double().t()) * s.double()
        want = _q8_reference(x, w, s)
        scale = float(exact.abs().max())
        for isa in _isas():
            q8 = native.q8_gemv(x, w, s, isa)
            f32 = native.f32_gemv(x, w, s, isa)
            assert q8.dtype == dtype and q8.shape == (1, n) and f32.dtype == dtype and f32.shape == (1, n)
            # the output rounded to the activations' dtype; fp32 sums in another order than the reference's doubles
            out_tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype] * scale
            assert float((q8.double() - want).abs().max()) <= out_tol + 1e-5 * scale, (n, k, isa)
            assert float((f32.double() - exact).abs().max()) <= out_tol + 1e-5 * scale, (n, k, isa)
            # and what the int8 activations cost against the exact product: at most half a step of each block's
            # scale per column, times |w| (the rounding bound of llama.cpp's Q8_0 activations)
            assert bool(((q8.double() - exact).abs() <= _q8_bound(x, w, s) + out_tol + 1e-5 * scale).all()), (n, k, isa)


def test_bad_arguments_are_errors_not_crashes(loaded):
    w = torch.zeros(4, 64, dtype=torch.int8)
    s = torch.ones(4)
    with pytest.raises(RuntimeError, match="one row of K = 64"):
        native.q8_gemv(torch.zeros(1, 32), w, s)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        native.q8_gemv(torch.zeros(1, 64), w.t().contiguous().t(), s)
    with pytest.raises(RuntimeError, match="scales must be fp32"):
        native.f32_gemv(torch.zeros(1, 64), w, s.double())


def test_the_layer_takes_the_chosen_native_kernel_eagerly_and_compiled(loaded):
    """``Int8Linear`` with the choice ``q8``/``f32``: one row eagerly through the op, and inside torch.compile as one
    opaque call per product; many rows (prefill) never take it."""
    n, k = 192, 128
    layer = kq.Int8Linear.from_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = x.double() @ layer.dequantize().double().t()
    for kernel in select.NATIVE:
        select.use({"int8": {"one_row_eager": kernel, "one_row_compiled": kernel}})
        step, graphs = compile_recording_graphs(lambda v: layer(v))
        with torch.inference_mode():
            eager = layer(x)
            compiled = step(x)
            many = layer(x.repeat(5, 1))
        op = native.one_row(kernel, x, layer.weight_int8, layer.scales)
        assert torch.equal(eager, op)
        assert f"kernels_quant_cpu.{kernel}_gemv" in graphs[0], graphs[0]
        torch.testing.assert_close(compiled.double(), want, atol=0.03 * float(want.abs().max()), rtol=0)
        torch.testing.assert_close(many[:1].double(), want, atol=0.03 * float(want.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="not a candidate"):
        select.use({"int8": {"one_row_eager": "fused"}})  # fused exists only compiled


def _child(build_dir, code: str, **env) -> dict:
    """``code`` in a fresh process (the library loads once per process), its last line of JSON."""
    prog = f"import json, torch\nfrom fmchat_kernels.quant import native\n{code}"
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env}, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_built_once_then_loaded_and_a_broken_build_or_file_is_a_reason_or_a_rebuild(tmp_path):
    """No compiler: load() is False with a one-line reason, and the selection offers no native candidate. A build:
    the library is kept; the next process loads it without compiling. A corrupt library file is rebuilt."""
    folder = str(tmp_path / "native")
    state = "print(json.dumps({'ok': ok, **native.status()}))"
    got = _child(folder, f"ok = native.load({folder!r})\n{state}", CXX=str(tmp_path / "no-such-c++"))
    assert got["ok"] is False and "build or load failed" in got["reason"] and "\n" not in got["reason"]
    got = _child(folder, "from fmchat_kernels.quant import select\n"
                 f"ok = native.load({folder!r})\nselect.ensure(None, ['int8'], cls='small')\n"
                 "print(json.dumps({'ok': ok, 'choice': select.current_choices()['int8']['one_row_eager']}))",
                 CXX=str(tmp_path / "no-such-c++"))  # fmt: skip
    assert got == {"ok": False, "choice": "int8pack"}
    got = _child(folder, f"ok = native.load({folder!r})\n{state}")
    assert got["ok"] is True and got["seconds"] is not None  # compiled now
    lib = got["path"]
    got = _child(folder, f"ok = native.load({folder!r})\n{state}")
    assert got["ok"] is True and got["seconds"] is None and got["path"] == lib  # found, not compiled again
    with open(lib, "wb") as f:
        f.write(b"not a shared library")
    got = _child(folder, f"ok = native.load({folder!r})\n{state}")
    assert got["ok"] is True and got["seconds"] is not None and got["path"] == lib  # rebuilt
    got = _child(folder, f"ok = native.load({folder!r})\n{state}", FMCHAT_NATIVE_KERNELS="off")
    assert got["ok"] is False and got["reason"].startswith("off")


def test_a_native_kernel_runs_in_the_saved_decode_step_of_the_next_launch(tiny_model, tmp_path, loaded):
    """``fmchat run --quant int8`` with the one-row choice ``q8`` (by ``FMCHAT_KERNEL_CHOICES``, whatever this machine
    measured): the first launch replies eagerly through the op and compiles the step ahead of time with the op in it;
    the second loads that package (the library loaded before it) and decodes compiled from its first reply, with the
    first launch's greedy float32 tokens."""
    from test_decode_aot import _run, _saved

    choice = json.dumps({"int8": {"one_row_eager": "q8", "one_row_compiled": "q8"}})
    os.environ["FMCHAT_KERNEL_CHOICES"] = choice  # read by the child processes (_run copies os.environ)
    try:
        first, err = _run(tiny_model, tmp_path, "--quant", "int8")
        assert all(t["decode_path"].startswith("eager") for t in first), [t["decode_path"] for t in first]
        assert "FMCHAT_KERNEL_CHOICES applied: int8: 1 row q8 (eager) / q8 (compiled)" in err
        (entry,) = _saved(tmp_path)
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["key"]["kernel_choices"]["int8"]["one_row_compiled"] == "q8", meta["key"]
        second, err = _run(tiny_model, tmp_path, "--quant", "int8")
    finally:
        del os.environ["FMCHAT_KERNEL_CHOICES"]
    assert all(t["decode_path"].startswith("compiled (inductor AOT, cached, ") for t in second), [t["decode_path"] for t in second]
    assert "compiling" not in err
    assert [t["reply"] for t in second] == [t["reply"] for t in first]

"""kernels/quant/select.py: the kernel of each weight product chosen by measuring on this machine, cached in a JSON
file; and every candidate kernel against the float reference (one row and many, eager and compiled)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compile_recording_graphs

from fmchat_kernels import quant as kq
from fmchat_kernels.quant import select
from fmchat_kernels.quant.gemv import fused_float_gemv, int4_cpu_block, int4_cpu_codes, int4_dequant


@pytest.fixture(autouse=True)
def _defaults():
    select.reset()
    yield
    select.reset()


def _w(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _close(got, want, tol=3e-2):
    torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, float(want.abs().max())), rtol=tol)


# ------------------------------------------------------------------ choosing and caching
def _fake_measure(calls):
    def measure(fmt, cls, compiled, options, say):
        calls.append((fmt, cls, compiled))
        rec = {**select.DEFAULTS[fmt], "shape": list(select.SHAPES[cls]), "compiled_measured": compiled}
        if fmt == "int8":
            rec.update(prefill="bf16", prefill_min_rows=16, chunk_rows=1024, one_row_compiled="int8pack")
        return rec

    return measure


def test_selection_is_measured_once_then_read_from_the_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(select, "_measure", _fake_measure(calls))
    path = tmp_path / "sub" / "kernels.json"
    first = select.ensure(path, ("int8", "bf16"), compiled=True)
    assert [c[0] for c in calls] == ["int8", "bf16"] and select.details()["source"] == "measured"
    assert first["int8"]["prefill"] == "bf16" and first["int8"]["one_row_compiled"] == "int8pack"
    assert select.one_row("int8", compiled=True) == "int8pack" and select.prefill_chunk("int8", 16) == 1024
    assert select.prefill_chunk("int8", 15) is None and select.prefill_chunk("int4", 512) is None  # int4: default
    assert select.prefill_plan("int8", 512) == (1024, torch.bfloat16)
    data = json.loads(path.read_text())
    assert first["key"] in data["entries"] and set(data["entries"][first["key"]]) == {"int8", "bf16"}
    json.dumps(first)

    select.reset()
    assert select.current_choices()["int8"] == select.DEFAULTS["int8"]
    again = select.ensure(path, ("int8", "bf16"), compiled=True)
    assert len(calls) == 2 and select.details()["source"] == "cached"  # read, not measured
    assert again == first  # the cache key of compiled artifacts is the same on the second load
    select.ensure(path, ("int4",))  # a format not in the file yet: measured and added, the others kept
    assert [c[0] for c in calls] == ["int8", "bf16", "int4"]
    assert set(json.loads(path.read_text())["entries"][first["key"]]) == {"int8", "bf16", "int4"}


def test_eager_only_entry_is_remeasured_when_the_compiled_step_asks(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(select, "_measure", _fake_measure(calls))
    path = tmp_path / "k.json"
    select.ensure(path, ("int8",), compiled=False)
    select.ensure(path, ("int8",), compiled=False)
    select.ensure(path, ("int8",), compiled=True)
    assert calls == [("int8", "large", False), ("int8", "large", True)]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": 999, "entries": {}}', "\x00\x01",
                                     '{"schema": 1, "entries": {"KEY": {"int8": {"one_row_eager": "nope"}}}}'])
def test_corrupt_or_stale_file_is_measured_again_not_an_error(tmp_path, monkeypatch, content):
    calls, said = [], []
    monkeypatch.setattr(select, "_measure", _fake_measure(calls))
    path = tmp_path / "k.json"
    path.write_text(content.replace("KEY", select.cache_key("large")))
    got = select.ensure(path, ("int8",), log=said.append)
    assert calls == [("int8", "large", False)] and got["int8"]["prefill"] == "bf16"
    assert json.loads(path.read_text())["entries"][got["key"]]["int8"]["prefill_min_rows"] == 16  # rewritten


def test_unwritable_cache_keeps_the_choice_for_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(select, "_measure", _fake_measure([]))
    blocker = tmp_path / "file"
    blocker.write_text("")
    said = []
    got = select.ensure(blocker / "k.json", ("int8",), log=said.append)  # parent is a file: cannot write
    assert got["int8"]["prefill"] == "bf16" and any("could not write" in s for s in said)


def test_pick_takes_the_fastest_but_keeps_the_default_on_a_near_tie():
    assert select._pick({"fused": 10.0, "int8pack": 2.0}, "fused") == "int8pack"
    assert select._pick({"fused": 10.0, "int8pack": 9.5}, "fused") == "fused"  # within the margin: noise
    assert select._pick({"fused": 1.0, "int8pack": 2.0}, "fused") == "fused"


def test_off_switch_keeps_the_defaults(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(select, "_measure", _fake_measure(calls))
    monkeypatch.setenv(select.OFF_ENV, "off")
    got = select.ensure(tmp_path / "k.json", ("int8",))
    assert calls == [] and got["int8"] == select.DEFAULTS["int8"] and not (tmp_path / "k.json").exists()
    assert "off" in select.details()["source"]


def test_model_formats_and_shapes():
    m = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 128, dtype=torch.bfloat16))
    m[0] = kq.Int8Linear.from_weight(m[0].weight)
    assert select.model_formats_and_shapes(m) == (["int8", "bf16"], [(64, 256), (128, 64)])


def test_large_models_choose_the_compiled_int8_kernel_per_weight_shape(tmp_path, monkeypatch):
    """Large class, compiled: each int8 weight shape too large for the caches gets the kernel measured on that shape
    (once; then the file answers), over the format's own choice; a new shape is measured alone; smaller shapes,
    eager loads and small models measure none."""
    calls, shapes = [], []
    monkeypatch.setattr(select, "_measure", _fake_measure(calls))

    def per_shape(fmt, shape, options, say):
        shapes.append(shape)
        return ("int8pack" if shape[1] > shape[0] else "fused"), {"fused": 2.0, "int8pack": 1.0}

    monkeypatch.setattr(select, "_measure_one_row_shape", per_shape)
    path = tmp_path / "k.json"
    wide, tall, tiny = (1024, 4096), (4096, 1024), (64, 192)  # 8 MiB, 8 MiB and 24 KiB at bf16
    select.ensure(path, ("int8",), compiled=True, cls="large", shapes_by_format={"int8": [tall, wide, tall, tiny]})
    assert shapes == [wide, tall]
    assert select.one_row("int8", compiled=True, shape=wide) == "int8pack"
    assert select.one_row("int8", compiled=True, shape=tall) == "fused"
    assert select.one_row("int8", compiled=True, shape=tiny) == "int8pack"  # the format's own (the fake measured that)
    assert select.one_row("int8", compiled=False, shape=wide) == "int8pack"  # eager: the eager choice
    key = select.current_choices()
    assert key["int8"]["one_row_compiled_by_shape"] == {"1024x4096": "int8pack", "4096x1024": "fused"}  # in the key
    select.reset()
    select.ensure(path, ("int8",), compiled=True, cls="large", shapes_by_format={"int8": [tall, wide]})
    assert len(shapes) == 2 and select.current_choices() == key  # read back, not measured again
    select.ensure(path, ("int8",), compiled=True, cls="large", shapes_by_format={"int8": [wide, (2048, 2048)]})
    assert shapes[2:] == [(2048, 2048)]
    select.reset()
    select.ensure(tmp_path / "small.json", ("int8",), compiled=True, cls="small", shapes_by_format={"int8": [wide]})
    select.ensure(tmp_path / "eager.json", ("int8",), compiled=False, cls="large", shapes_by_format={"int8": [wide]})
    assert len(shapes) == 3
    assert select.DEFAULTS["int8"]["one_row_compiled_by_shape"] == {}  # the defaults themselves never grow


def test_the_per_shape_measurement_and_the_shapes_a_model_multiplies_by():
    """The real per-shape measurement (two compiles of a small weight), and which shapes a model's int8 products
    have: an embedding's store only when it is also the output head."""
    choice, times = select._measure_one_row_shape("int8", (128, 256), None, lambda m: None)
    native = set(select.NATIVE) if kq.native.available() else set()
    assert choice in select.ONE_ROW[("int8", True)] and set(times) == {"fused", "int8pack", *native} and min(times.values()) > 0
    from transformers import AutoModelForCausalLM, LlamaConfig

    for tied in (False, True):
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
        model = AutoModelForCausalLM.from_config(cfg)
        kq.quantize_model(model, "int8", rest_dtype=torch.bfloat16)
        _, _, by = select._formats_and_shapes(model)
        assert ((320, 64) in by["int8"]) == tied and (128, 64) in by["int8"] and (64, 128) in by["int8"]


def test_compiled_int8_layer_follows_its_shape_s_choice():
    n, k = 192, 128
    layer = kq.Int8Linear.from_weight(_w(n, k), compute_dtype=torch.bfloat16)
    x = _x(1, k)
    want = x.double() @ layer.dequantize().double().t()
    for by_shape, opaque in (({"192x128": "int8pack"}, True), ({"128x192": "int8pack"}, False)):  # (set by hand)
        select.use({"int8": {"one_row_compiled": "fused", "one_row_compiled_by_shape": by_shape}})
        step, graphs = compile_recording_graphs(lambda v: layer(v))
        with torch.inference_mode():
            got = step(x)
        _close(got, want)
        assert ("kernels_quant.int8pack_mm" in graphs[0]) == opaque, graphs[0]
    assert "int8pack for 128x192" in select.describe(["int8"])


def test_prefill_crossover_is_remeasured_when_noise_makes_it_inconsistent():
    t = {"packed@4": 1, "float@4": 2, "packed@8": 2, "float@8": 1, "packed@16": 4, "float@16": 2, "packed@64": 16,
         "float@64": 8, "packed@256": 64, "float@256": 65}  # fmt: skip
    assert select._inconsistent(t) and not select._float_wins(t, 256) and select._float_wins(t, 64)
    t["float@256"] = 30
    assert not select._inconsistent(t)


def test_shape_class_and_key():
    assert select.shape_class([(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]) == "small"
    qwen = [(896, 896)] * 2 + [(128, 896)] * 2 + [(4864, 896)] * 2 + [(896, 4864)]  # Qwen2.5-0.5B: most bytes in its MLP
    assert select.shape_class(qwen) == "large"
    assert select.shape_class(None) == "large"
    key = select.cache_key("small")
    assert torch.__version__ in key and torch.backends.cpu.get_cpu_capability() in key and key.endswith("small")


def test_real_measurement_picks_among_the_candidates(tmp_path):
    """The real measurement (eager candidates, small class: about a second): every choice is a candidate, the
    medians are recorded, and the file then answers."""
    path = tmp_path / "k.json"
    got = select.ensure(path, ("int8", "int4"), cls="small")
    for fmt in ("int8", "int4"):
        c = got[fmt]
        assert c["one_row_eager"] in select.ONE_ROW[(fmt, False)]
        assert c["prefill"] in select.PREFILL
        assert c["prefill_min_rows"] in (None, *select.PREFILL_ROWS)
        assert (c["chunk_rows"] is None) == (c["prefill_min_rows"] is None)
        d = select.details()["measured"][fmt]
        assert d["one_row_eager_us"] and d["prefill_us"] and d["one_row_vs_bf16"]["eager"] > 0
    line = select.describe()
    assert "int8: 1 row" in line and "int4: 1 row" in line and "bf16: 1 row" not in line and "(measured [small])" in line
    select.reset()
    assert select.ensure(path, ("int8", "int4"), cls="small") == got


# ------------------------------------------------------------------ every candidate against the float reference
def test_int4_cpu_layout_decodes_as_the_converter_packs():
    # The layout is the running ISA's (64-row blocks with AVX-512, 32 with AVX2): this checks the one of this machine.
    assert int4_cpu_block() == (64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32)
    for n in (64, 128 + 16, 192 + 48):  # whole 64-row blocks, plus a tail
        q = torch.randint(0, 16, (n, 96), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(int4_cpu_codes(packed, 96).int(), q)
        assert torch.equal(int4_cpu_codes(packed[:64], 96).int(), q[:64])  # a slice of whole blocks


@pytest.mark.parametrize("m", [1, 7, 64])
def test_int8_candidates_match_the_float_reference(m):
    n, k = 320, 256
    layer = kq.Int8Linear.from_weight(_w(n, k), compute_dtype=torch.bfloat16)
    x = _x(m, k)
    want = x.double() @ layer.dequantize().double().t()
    s = layer.scales.to(torch.bfloat16)
    _close(torch._weight_int8pack_mm(x, layer.weight_int8, s), want)
    for chunk in (0, 64, 100, 1000):
        _close(layer.mm_float_chunks(x, chunk), want)
        _close(layer.mm_float_chunks(x, chunk, torch.float32), want)
    if m == 1:
        _close(kq.int8_gemv(x, layer.weight_int8, layer.scales), want)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_int4_candidates_match_the_float_reference(m):
    n, k = 320, 256  # 5 blocks of 64 rows
    layer = kq.Int4Linear.from_weight(_w(n, k), compute_dtype=torch.bfloat16)
    if layer.layout != "cpu":
        pytest.skip("this torch has no CPU int4 packing")
    ref_w = layer.dequantize().double()
    x = _x(m, k)
    want = x.double() @ ref_w.t()
    _close(torch._weight_int4pack_mm_for_cpu(x, layer.weight_int4, layer.group_size, layer.scales_zeros.to(x.dtype)), want)
    for chunk in (0, 64, 128):
        _close(layer.mm_float_chunks(x, chunk), want)
        _close(layer.mm_float_chunks(x, chunk, torch.float32), want)
    deq = int4_dequant(int4_cpu_codes(layer.weight_int4, k), layer.scales_zeros, layer.group_size, torch.float32)
    torch.testing.assert_close(deq.double(), ref_w, atol=1e-6, rtol=1e-6)  # the decode is the kernel's own values


def test_bf16_candidates_match_the_float_reference():
    n, k = 320, 256
    w = _w(n, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    x = _x(1, k)
    want = x.double() @ w.double().t() + b.double()
    _close(fused_float_gemv(x, w, b), want)
    for choice in ("fused", "linear"):
        select.use({"bf16": {"one_row_compiled": choice}})
        _close(kq.float_gemv(x, w, b), want)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_compiled_one_row_candidates_match_and_follow_the_choice(fmt):
    """Inside torch.compile the layers take the chosen one-row kernel: the packed op (opaque) or the fused loop; both
    give the float reference's result. Traced with inductor (the step's compiler) at one small shape."""
    n, k = 192, 128
    w = _w(n, k)
    x = _x(1, k)
    if fmt == "int8":
        layer = kq.Int8Linear.from_weight(w, compute_dtype=torch.bfloat16)
        want = x.double() @ layer.dequantize().double().t()
        choices, opaque = ("fused", "int8pack"), "kernels_quant.int8pack_mm"
    else:
        layer = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        layer.weight.data = w.to(torch.bfloat16)
        layer.weight.requires_grad_(False)
        want = x.double() @ layer.weight.double().t()
        choices, opaque = ("fused", "linear"), None
    for choice in choices:
        select.use({fmt: {"one_row_compiled": choice}})
        fn = (lambda v: layer(v)) if fmt == "int8" else (lambda v: kq.float_gemv(v, layer.weight))
        step, graphs = compile_recording_graphs(fn)
        with torch.inference_mode():
            got = step(x)
        _close(got, want)
        if opaque:
            assert (opaque in graphs[0]) == (choice == "int8pack"), graphs[0]
        else:
            assert ("linear" in graphs[0]) == (choice == "linear"), graphs[0]


# ------------------------------------------------------------------ the prefill path
@pytest.mark.parametrize("prefill", ["bf16", "fp32"])
@pytest.mark.parametrize("cls", [kq.Int8Linear, kq.Int4Linear])
def test_prefill_through_a_float_gemm_equals_the_packed_path(cls, prefill, monkeypatch):
    """The layer's forward with the measured prefill choice (bf16 GEMM on dequantized chunks) equals the old path
    (the packed kernel) within bf16 tolerance, bias included; below the row threshold the packed kernel runs."""
    n, k = 256, 192
    w, bias = _w(n, k), torch.randn(n) * 0.1
    layer = cls.from_weight(w, bias, compute_dtype=torch.bfloat16)
    if cls is kq.Int4Linear and layer.layout != "cpu":
        pytest.skip("this torch has no CPU int4 packing")
    x = torch.randn(2, 40, k).to(torch.bfloat16)
    old = layer(x)  # defaults: the packed kernel
    fmt = layer.scheme
    select.use({fmt: {"prefill": prefill, "prefill_min_rows": 16, "chunk_rows": 64}})
    used = []
    real = layer.mm_float_chunks
    monkeypatch.setattr(layer, "mm_float_chunks", lambda *a: used.append(a[0].shape[0]) or real(*a))
    new = layer(x)
    assert used == [80] and new.shape == old.shape and new.dtype == old.dtype
    torch.testing.assert_close(new.float(), old.float(), atol=2e-2, rtol=2e-2)
    layer(x[:, :7])  # 14 rows: under the threshold, the packed kernel
    assert used == [80]


def test_a_compile_in_another_thread_does_not_switch_the_eager_path(monkeypatch):
    """torch.compiler.is_compiling() is one process-wide flag, true in every thread while any thread compiles (a
    backend compiling its step in the background): the layers ask is_dynamo_compiling() (true only inside the trace),
    so eager calls elsewhere keep their eager kernels."""
    layer = kq.Int8Linear.from_weight(_w(128, 64), compute_dtype=torch.bfloat16)
    select.use({"int8": {"prefill": "bf16", "prefill_min_rows": 2, "chunk_rows": 0}})
    used = []
    real = layer.mm_float_chunks
    monkeypatch.setattr(layer, "mm_float_chunks", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)  # as while another thread compiles
    assert torch.compiler.is_compiling()
    layer(_x(4, 64))
    assert used == [1]
    calls = []
    monkeypatch.setattr(select.choices, "one_row", lambda *a, **k: calls.append(a) or "fused")
    w = _w(96, 64).to(torch.bfloat16)
    x = _x(1, 64)
    _close(kq.float_gemv(x, w), x.double() @ w.double().t())  # eager: the library GEMV, the choice not even asked
    assert calls == []


# ------------------------------------------------------------------ bf16 prefill (a CPU without bf16 GEMMs: AVX2)
def test_bf16_prefill_is_measured_and_described(tmp_path):
    """The real measurement of bf16 weights includes the prefill path: the bf16 GEMM or fp32 GEMMs over chunks of
    the weight, from a measured row count; the header line says which."""
    got = select.ensure(tmp_path / "k.json", ("bf16",), cls="small")["bf16"]
    assert got["prefill"] in select.choices.PREFILL_BF16
    assert got["prefill_min_rows"] in (None, *select.PREFILL_ROWS)
    assert (got["prefill"] == "fp32") == (got["prefill_min_rows"] is not None)
    assert select.details()["measured"]["bf16"]["prefill_us"]
    want = "prefill bf16 linear" if got["prefill"] == "linear" else f"prefill fp32 GEMM from {got['prefill_min_rows']} rows"
    assert want in select.describe(["bf16"])


def test_a_bf16_models_prefill_follows_the_chosen_path(tiny_model, monkeypatch):
    """Every bf16 linear of a CPU load runs the measured prefill path eagerly (compiled.DecodeLinear): with fp32
    chosen from 16 rows, a 40-token prompt goes through fp32 GEMMs over 64-row chunks of each weight, and its logits
    match the bf16 GEMM's; a one-token step keeps the plain product."""
    from fmchat.backends.transformers.compiled import DecodeLinear
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend
    from fmchat_kernels.quant import gemv

    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="bfloat16", compile="eager", ctx=128))
    linears = [m for m in b.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is DecodeLinear for m in linears)
    ids = list(range(100, 140))
    select.use({"bf16": {"prefill": "linear", "prefill_min_rows": None, "chunk_rows": None}})
    want = b.forward(ids)
    b.truncate(0)
    select.use({"bf16": {"prefill": "fp32", "prefill_min_rows": 16, "chunk_rows": 64}})
    rows = []
    real = gemv.float_mm_chunks
    monkeypatch.setattr(gemv, "float_mm_chunks", lambda x2, w, *a: rows.append(x2.shape[0]) or real(x2, w, *a))
    got = b.forward(ids)
    assert rows and set(rows) == {40}  # every linear of every layer but the head (logits_to_keep=1: one row)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    rows.clear()
    b.forward([7])
    assert rows == []
    select.reset()

"""kernels/quant: error bounds, stored bytes, no full-precision shadow copy, tiny-model logits, switching."""

from __future__ import annotations

import gc
import io
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from fmchat_kernels import quant as kq

N, K = 96, 256  # K a multiple of the int4 group


def weights(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(N, K, generator=g) * 0.05
    # heavy-tailed: Student t with 2 degrees of freedom (infinite variance), plus a few large outliers
    z = torch.randn(N, K, generator=g)
    chi = torch.randn(N, K, 2, generator=g).pow(2).sum(-1)
    w = 0.02 * z / (chi / 2).sqrt()
    w[torch.arange(N), torch.randint(0, K, (N,), generator=g)] *= 30
    return w


KINDS = ("normal", "heavy")


@pytest.mark.parametrize("kind", KINDS)
def test_int8_error_bound_and_store(kind):
    w = weights(kind)
    q = kq.Int8Linear.from_weight(w)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (N, K)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (N,)
    step = w.abs().amax(dim=1) / 127
    err = (q.dequantize() - w).abs()
    assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all()  # round to nearest: at most half a step
    assert kq.bytes_per_weight(q) == pytest.approx(1 + 4 / K)
    if kind == "normal":
        assert kq.relative_error(q, w) < 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_int4_error_bound_and_store(kind):
    w = weights(kind)
    q = kq.Int4Linear.from_weight(w)
    assert q.weight_int4.dtype == torch.uint8 and q.weight_int4.shape == (N, K // 2)  # two codes per byte
    assert q.scales_zeros.dtype == torch.bfloat16 and q.scales_zeros.shape == (K // 32, N, 2)
    assert kq.bytes_per_weight(q) == pytest.approx(0.5 + 4 / 32)
    g = w.reshape(N, K // 32, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, dim=1)
    err = (q.dequantize() - w).abs()
    # half a step, plus what rounding the scale and zero to bf16 (8 significant bits) can add
    assert (err <= step * 0.5 * 1.05 + w.abs().amax() * 2**-8).all()
    assert kq.relative_error(q, w) < 0.12


@pytest.mark.parametrize("kind", KINDS)
def test_log8_error_bound_and_store(kind):
    w = weights(kind)
    q = kq.Log8Linear.from_weight(w)
    assert q.codes.dtype == torch.int8 and q.codes.shape == (N, K)  # one byte, sign inside the code
    assert q.log_lo.shape == q.log_step.shape == (N,)
    assert kq.bytes_per_weight(q) == pytest.approx(1 + 8 / K)
    deq = q.dequantize()
    assert torch.equal(torch.sign(deq) * (q.codes != 0), torch.sign(w) * (q.codes != 0))  # signs kept
    assert (deq[q.codes == 0] == 0).all()
    ratio = torch.exp2(q.log_step)[:, None]
    floor = torch.exp2(q.log_lo)[:, None]  # smallest non-zero magnitude of the row
    bound = torch.maximum(w.abs() * (ratio - 1) / 2, floor / 2)  # neighbours differ by 2**step; below: 0 or floor
    assert ((deq - w).abs() <= bound * (1 + 1e-4) + 1e-12).all()


def test_log8_beats_int8_on_heavy_tails_and_loses_on_gaussian():
    heavy, normal = weights("heavy", 1), weights("normal", 1)
    assert kq.relative_error(kq.Log8Linear.from_weight(heavy), heavy) < kq.relative_error(kq.Int8Linear.from_weight(heavy), heavy)
    assert kq.relative_error(kq.Log8Linear.from_weight(normal), normal) > kq.relative_error(kq.Int8Linear.from_weight(normal), normal)


@pytest.mark.parametrize("cls", [kq.Int8Linear, kq.Int4Linear, kq.Log8Linear])
def test_forward_matches_dequantized_weight(cls):
    w, b = weights("normal"), torch.randn(N) * 0.1
    q = cls.from_weight(w, b)
    x = torch.randn(2, 3, K)
    y = q(x)
    assert y.shape == (2, 3, N) and y.dtype == x.dtype
    ref = x @ q.dequantize().t() + b
    # int8/int4 multiply with bf16 activations (the fast CPU kernels): bf16 rounding of x, ~2**-8 relative
    tol = 1e-5 if q.compute_dtype == torch.float32 else 2e-2
    assert (y - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("cls", [kq.Int8Linear, kq.Int4Linear, kq.Log8Linear])
def test_state_dict_round_trip(cls):
    q = cls.from_weight(weights("heavy"), torch.randn(N))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    fresh = cls(K, N, torch.zeros(N), compute_dtype=q.compute_dtype, **({"layout": q.layout} if cls is kq.Int4Linear else {}))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(4, K)
    assert torch.equal(fresh(x), q(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, K)
        self.up = nn.Linear(K, 2 * K)
        self.down = nn.Linear(2 * K, K, bias=False)
        self.lm_head = nn.Linear(K, 100, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.down(torch.relu(self.up(self.embed(ids)))))


@pytest.mark.parametrize("scheme", ["int8", "int4", "log8"])
def test_no_full_precision_shadow_copy(scheme):
    m = Tiny()
    up_w = weakref.ref(m.up.weight)
    emb_w = weakref.ref(m.embed.weight)
    fp_bytes = kq.model_bytes(m)
    report = kq.quantize_model(m, scheme, rest_dtype=torch.bfloat16)
    gc.collect()
    assert up_w() is None and emb_w() is None  # the original weight tensors were freed
    assert not any(isinstance(x, nn.Linear) for x in m.modules())
    assert m.lm_head is m.embed.store  # tied head: one table, used both ways
    n_weights = 100 * K + K * 2 * K + 2 * K * K
    # every byte the module holds: the low-bit stores, their scales, the (bf16) bias; nothing at 4 bytes/weight
    assert report.bytes_after == kq.model_bytes(m) < n_weights * 1.1 < fp_bytes / 3.5
    assert not any(t.dtype == torch.float32 and t.numel() >= K * K for t in m.state_dict().values())
    assert "up" in report.quantized and "down" in report.quantized


def test_requantizing_raises_and_casts_are_marked():
    m = Tiny()
    kq.quantize_model(m, "int8")
    with pytest.raises(kq.AlreadyQuantized):
        kq.quantize_model(m, "int4")
    c = Tiny()
    kq.quantize_model(c, "bf16")
    assert c.up.weight.dtype == torch.bfloat16
    with pytest.raises(kq.AlreadyQuantized):
        kq.quantize_model(c, "int8")
    with pytest.raises(ValueError):
        kq.quantize_model(Tiny(), "int3")


def test_kernels_quant_does_not_import_fmchat():
    import ast
    from pathlib import Path

    files = sorted(Path(kq.__file__).parent.glob("*.py"))  # the package is split per scheme: read every module
    assert len(files) > 1
    for f in files:
        names = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(f.read_text()))
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])]  # fmt: skip
        assert not any((x or "") == "fmchat" or (x or "").startswith("fmchat.") for x in names), f


# ------------------------------------------------------------------ tiny HF models through the backend
def _logits(backend, ids):
    with torch.inference_mode():
        return backend.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def test_tiny_model_logits_close_per_scheme(tiny_model):
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    load = lambda q: load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", quant=q))  # noqa: E731
    ref = load("none")
    ids = ref.render([{"role": "user", "content": "Tell me about the sea and the sky."}])
    base = _logits(ref, ids)
    errs, top1 = {}, {}
    for q in ("bf16", "int8", "int4", "log8"):
        b = load(q)
        assert b.quant == q
        lg = _logits(b, ids)
        errs[q] = float((lg - base).norm() / base.norm())
        top1[q] = float((lg.argmax(-1) == base.argmax(-1)).float().mean())
        assert b.weights_bytes() < ref.weights_bytes()
        with pytest.raises(ValueError):  # the loaded model is quantized: switching must reload
            from fmchat_kernels.quant import quantize_model

            quantize_model(b.model, "int8")
    # A random 2-layer model (measured: bf16 1.2%, int8 2.6%, log8 3.4%, int4 22% relative logit error);
    # its logits have many near-ties, so top-1 agreement is only a coarse check here.
    assert errs["bf16"] < 0.02 and errs["int8"] < 0.04 and errs["log8"] < 0.05 and errs["int4"] < 0.3
    assert errs["bf16"] < errs["int8"] < errs["int4"] and errs["log8"] < errs["int4"]
    assert min(top1["bf16"], top1["int8"], top1["log8"]) >= 0.85 and top1["int4"] >= 0.4


def test_switching_by_reload_keeps_the_conversation(tiny_model):
    from conftest import make_session

    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    s = make_session(tiny_model, max_new_tokens=6)
    s.run_turn("Hello there.")
    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", quant="int8"))
    s.replace_backend(b)
    done = s.run_turn("And again?")
    assert s.backend.quant == "int8" and len(s.messages) == 4
    assert done.stats.weights_bytes == b.weights_bytes()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_one_row_gemvs_match_the_dequantized_matmul(compiled):
    """kernels.quant.float_gemv (bf16 weights + bias) and int8_gemv (int8 codes x per-row scales), as the compiled
    decode step traces them, against an fp64 matmul of the same weights; layer-shaped (1536x576, 576x1536)."""
    g = torch.Generator().manual_seed(0)
    fg = torch.compile(kq.float_gemv, dynamic=False) if compiled else kq.float_gemv
    ig = torch.compile(kq.int8_gemv, dynamic=False) if compiled else kq.int8_gemv
    for n, k in ((1536, 576), (576, 1536)):
        x = torch.randn(1, k, generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        want = x.double() @ w.double().t() + b.double()
        got = fg(x, w, b)
        assert got.shape == (1, n) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
        lin = kq.Int8Linear.from_weight(w.float(), compute_dtype=torch.bfloat16)
        want8 = x.double() @ lin.dequantize().double().t()
        got8 = ig(x, lin.weight_int8, lin.scales)
        assert got8.shape == (1, n) and got8.dtype == torch.bfloat16
        torch.testing.assert_close(got8.double(), want8, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ quantizing while loading (streamed weights)
@pytest.mark.parametrize("cls", [kq.Int8Linear, kq.Int4Linear, kq.Log8Linear])
def test_from_weight_in_row_chunks_equals_one_pass(cls, monkeypatch):
    """from_weight quantizes a chunk of rows at a time (bounded float32 temporaries): the same bits as one pass, for
    a bf16 weight (upcast chunk by chunk) as for its float32 copy, with a last chunk that is not a whole block."""
    from fmchat_kernels.quant import common

    w = torch.cat([weights("heavy", 3), weights("normal", 4), weights("heavy", 5)])[:272].to(torch.bfloat16)  # 272 rows
    bias = torch.randn(272)
    monkeypatch.setattr(common, "QUANT_CHUNK_ELEMS", 1 << 30)
    whole = cls.from_weight(w.float(), bias).state_dict()
    monkeypatch.setattr(common, "QUANT_CHUNK_ELEMS", 64 * K)  # 64-row chunks: 5 of them, the last 16 rows
    assert [r.stop - r.start for r in common.row_chunks(272, K)] == [64, 64, 64, 64, 16]
    chunked = cls.from_weight(w, bias).state_dict()
    assert whole.keys() == chunked.keys()
    for k, t in whole.items():
        assert t.dtype == chunked[k].dtype and torch.equal(t, chunked[k]), k


def _bf16_copy(src: Path, dst: Path, shard: bool) -> Path:
    """The model in ``src`` saved again as bf16 safetensors (sharded, with an index, when ``shard``) + its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.save_pretrained(str(dst), max_shard_size="300KB" if shard else "10GB")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory, smol_tokenizer):
    """bf16 checkpoints: Llama with tied embeddings, sharded (an index + 2+ files); Qwen2 (biases on q, k, v);
    Phi-3 (fused qkv and gate_up projections). And Qwen2 as saved, in float32 (a bias and its weight both read as
    they are stored)."""
    from conftest import build_tiny_model

    out = {}
    cases = (("llama", {"tie_word_embeddings": True}, True), ("qwen2", {}, False), ("phi3", {}, False))
    for arch, extra, shard in cases:
        fp32 = build_tiny_model(tmp_path_factory.mktemp(f"fp32-{arch}"), smol_tokenizer, arch, **extra)
        out[arch] = _bf16_copy(fp32, tmp_path_factory.mktemp(f"bf16-{arch}"), shard)
        if arch == "qwen2":
            out["qwen2-float32"] = fp32
    assert (out["llama"] / "model.safetensors.index.json").is_file()
    assert len(list(out["llama"].glob("model-*.safetensors"))) >= 2
    return out


def _kind(m: nn.Module) -> str:
    """A module's class name; a CPU load's ``DecodeLinear`` (an ``nn.Linear`` whose forward picks the measured
    kernels, swapped in by class at load) counts as the ``Linear`` it is."""
    from fmchat.backends.transformers.compiled import DecodeLinear

    return "Linear" if type(m) is DecodeLinear else type(m).__name__


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        assert t.dtype == sb[k].dtype and t.shape == sb[k].shape and torch.equal(t, sb[k]), k
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones too (RoPE's inv_freq)
    assert bufs_a.keys() == bufs_b.keys()
    for k, t in bufs_a.items():
        assert t.dtype == bufs_b[k].dtype and torch.equal(t, bufs_b[k]), k
    assert [_kind(m) for m in a.modules()] == [_kind(m) for m in b.modules()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen2-float32"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "log8"])
def test_streamed_quantization_equals_quantizing_the_float32_model(bf16_models, arch, scheme):
    """The streamed load (each bf16 tensor quantized as it is read) holds bit for bit what quantize_model makes from
    the whole model loaded in float32 (the previous way), reports the same, and says so per tensor."""
    from transformers import AutoModelForCausalLM

    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    path = bf16_models[arch]
    steps = []
    # one thread (load_backend sets it for the process, the reference below too): on a shared 2-core CPU the many
    # small per-chunk ops of log8 on a 49k x 64 table wait on the second thread far longer than they compute
    config = RunConfig(model=str(path), device="cpu", quant=scheme, threads=1)
    b = load_backend(config, progress=lambda s, f: steps.append((s, f)))
    assert b.weights_load == "streamed" and b.dtype == "bfloat16"
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    report = kq.quantize_model(ref, scheme, rest_dtype=torch.bfloat16)
    _same_weights(b.model, ref)
    got = b.quant_report
    assert (got.quantized, got.skipped, got.bytes_before, got.bytes_after) == (
        report.quantized, report.skipped, report.bytes_before, report.bytes_after)  # fmt: skip
    if arch == "llama":  # tied: the head is the embedding's store, held once
        assert b.model.lm_head is b.model.model.embed_tokens.store
    assert b.model.generation_config.eos_token_id == ref.generation_config.eos_token_id
    per_tensor = [f for s, f in steps if s.startswith(f"loading and quantizing weights ({scheme})")]
    n = len({id(p) for p in AutoModelForCausalLM.from_pretrained(str(path)).parameters()})
    assert len(per_tensor) == n and per_tensor == sorted(per_tensor) and per_tensor[-1] == 1.0
    assert [f for s, f in steps if s.startswith(f"keeping the {scheme} weights for the next launch")][-1:] == [1.0]

    # the next load maps the codes the first one kept (quant_store.py): the same tensors, settings, ties and logits
    steps.clear()
    again = load_backend(config, progress=lambda s, f: steps.append((s, f)))
    assert again.weights_load == "stored"
    assert not [s for s, f in steps if s.startswith("loading and quantizing")]
    assert [f for s, f in steps if s.startswith(f"mapping the {scheme} weights kept")][-1:] == [1.0]
    _same_weights(again.model, ref)
    stored = again.quant_report
    assert (stored.quantized, stored.skipped, stored.bytes_before) == (report.quantized, report.skipped, report.bytes_before)
    if arch == "llama":
        assert again.model.lm_head is again.model.model.embed_tokens.store
    for (name, m), m2 in zip(b.model.named_modules(), again.model.modules()):
        if isinstance(m, kq.QuantizedLinear):  # compute dtype, int4's packed layout: as the quantizing load set them
            assert (m.compute_dtype, getattr(m, "layout", None)) == (m2.compute_dtype, getattr(m2, "layout", None)), name
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, b.model(ids).logits)


@pytest.mark.parametrize(("arch", "quant", "dtype", "how"), [
    ("llama", "none", "float32", "streamed"),  # bf16 checkpoint, upcast tensor by tensor
    ("qwen2", "fp16", "auto", "streamed"),  # bf16 -> fp16
    ("phi3", "bf16", "auto", "mapped"),  # already bf16: transformers maps the file, no copy
    ("phi3", "none", "bfloat16", "mapped"),
])  # fmt: skip
def test_streamed_and_mapped_casts_equal_from_pretrained(bf16_models, arch, quant, dtype, how):
    from transformers import AutoModelForCausalLM

    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    path = bf16_models[arch]
    steps = []
    config = RunConfig(model=str(path), device="cpu", quant=quant, dtype=dtype)
    b = load_backend(config, progress=lambda s, f: steps.append((s, f)))
    assert b.weights_load == how
    per_tensor = [f for s, f in steps if s.endswith(" tensors")]  # "loading weights (float32): 3/24 tensors"
    assert len(per_tensor) >= 10 and per_tensor == sorted(per_tensor) and per_tensor[-1] == 1.0
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(quant) or getattr(torch, dtype)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=target)
    if quant != "none":
        kq.quantize_model(ref, quant)
    _same_weights(b.model, ref)


def test_float32_checkpoint_to_bf16_streams_and_other_layouts_load_in_full(tiny_model, tmp_path):
    """A float32 checkpoint at bf16 is streamed too (the previous way: from_pretrained at bf16, then marked); a
    checkpoint the streamed path cannot read one to one (here .bin files) loads the previous way, and says why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", quant="bf16"))
    assert b.weights_load == "streamed"
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
    kq.quantize_model(ref, "bf16")
    _same_weights(b.model, ref)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(tmp_path))
    assert not list(tmp_path.glob("*.safetensors"))
    full = load_backend(RunConfig(model=str(tmp_path), device="cpu", quant="int8"))
    assert full.weights_load == "full (no safetensors weights)"
    streamed = load_backend(RunConfig(model=str(tiny_model), device="cpu", quant="int8"))
    _same_weights(full.model, streamed.model)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smol_tokenizer):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3-quant"), smol_tokenizer, "gemma3")


def test_quantized_gemma3_keeps_the_embedding_scale(tiny_gemma3):
    """Gemma 3 multiplies its input embeddings by sqrt(hidden size) (Gemma3TextScaledWordEmbedding; 8 here): the
    quantized embedding must too, or every layer sees inputs 8x too small. Each scheme's logits track the float
    model's; the same quantized model with the scale taken out is far off (so the tolerance tells them apart)."""
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    def load(q):
        return load_backend(RunConfig(model=str(tiny_gemma3), device="cpu", dtype="float32", quant=q))

    ref = load("none")
    assert type(ref.model.model.embed_tokens).__name__ == "Gemma3TextScaledWordEmbedding"
    ids = ref.render([{"role": "user", "content": "Tell me about the sea and the sky."}])
    base = _logits(ref, ids)

    def err(lg):
        return float((lg - base).norm() / base.norm())

    for q, bound in (("int8", 0.05), ("int4", 0.3), ("log8", 0.06)):
        b = load(q)
        emb = b.model.model.embed_tokens
        assert isinstance(emb, kq.QuantizedEmbedding) and emb.scale == pytest.approx(8.0), (q, emb)
        scaled = err(_logits(b, ids))
        emb.scale = None  # what quantize_model used to build
        unscaled = err(_logits(b, ids))
        assert scaled < bound < unscaled, (q, scaled, unscaled)


def test_an_embedding_with_an_unknown_forward_is_kept():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = nn.Sequential()
    model.emb = Shifted(300, 64)
    model.proj = nn.Linear(64, 64)
    model.get_input_embeddings = lambda: model.emb
    report = kq.quantize_model(model, "int8")
    assert isinstance(model.emb, Shifted) and "proj" in report.quantized
    assert any(s.startswith("emb (Shifted has a forward of its own") for s in report.skipped), report.skipped

"""The compiled one-token decode step (--compile): same greedy tokens as eager, a reported fallback, bench decode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import REPO, build_tiny_model

from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

REPO_SHAPES = REPO / "fmchat" / "shapes"
TURNS = ["Hello there.", "Tell me about the sea.", "And the mountains?", "Thanks, one more word."]


def _session(model_dir, loader=load_backend, **load) -> ChatSession:
    opts = {"device": "cpu", "dtype": "float32", "ctx": 512, **load}
    backend = loader(RunConfig(model=str(model_dir), **opts))
    return ChatSession(backend, SessionConfig(gen=GenerationConfig(max_new_tokens=16, temperature=0.0, seed=0)))


def _run(session: ChatSession) -> list[list[int]]:
    out = []
    for t in TURNS:
        session.run_turn(t)
        out.append(list(session.messages[-1].token_ids))
    return out


@pytest.fixture(scope="module")
def eager_ids(tiny_model):
    return _run(_session(tiny_model, compile="eager"))  # the reference: sdpa, DynamicCache, eager


@pytest.mark.parametrize("kind", ["aot", "jit"])
def test_compiled_greedy_matches_eager_float32(tiny_model, eager_ids, kind, monkeypatch):
    """Both ways of compiling the step: ahead of time (AOTInductor, the default) and torch.compile (the fallback when
    the export fails; FMCHAT_AOT=0 asks for it)."""
    if kind == "jit":
        monkeypatch.setenv("FMCHAT_AOT", "0")
    s = _session(tiny_model, compile="on")
    b = s.backend
    assert b._step is not None, b.compile_status
    # the decode path says which: "compiled (inductor AOT, ...)" or "compiled (inductor, ...)" for torch.compile
    assert b.compile_status.startswith("compiled (inductor AOT, " if kind == "aot" else "compiled (inductor, ")
    assert b._step.kind == kind
    if kind == "jit":
        assert b._step.direct is not None  # after warm-up, steps skip Dynamo's guard evaluation (checked equal there)
    calls = {"n": 0}
    step = b._step
    real = step.__call__

    class Counting:
        covers = staticmethod(step.covers)

        def __call__(self, token, position):
            calls["n"] += 1
            return real(token, position)

    b._step = Counting()
    got = _run(s)
    assert got == eager_ids  # token-identical over several turns (KV prefix reused between them)
    assert calls["n"] > 20  # the decode really went through the compiled step
    assert s.messages[-1].stats.decode_path.startswith("compiled")
    assert b.cached_tokens() == len(s.ledger) == b.cache.seq_lens_list()[0]
    assert int(b.cache.layers[0].seq_lens[0]) == len(s.ledger)  # device fill agrees with the host mirror


# Phi-3.5-mini's kind of configuration: a sliding window longer than any context (262144 there) and LongRoPE, whose
# rotary factors switch by position (short below original_max_position_embeddings, long from it on: 64 here, which
# the chat below passes)
PHI35_LIKE = {
    "sliding_window": 4096,
    "original_max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                        "short_factor": [1.0] * 8, "long_factor": [1.0 + i / 2 for i in range(8)]},
}  # fmt: skip


@pytest.mark.parametrize("arch,extra", [("phi3", {"sliding_window": 24}), ("phi3", PHI35_LIKE), ("qwen2", {})],
                         ids=["phi3-window", "phi3.5-like", "qwen2"])  # fmt: skip
def test_compiled_matches_eager_other_archs(tmp_path, smol_tokenizer, arch, extra):
    """Phi-3 (fused qkv, here with a sliding window shorter than the chat), Phi-3 configured like Phi-3.5 (a window
    longer than the context, LongRoPE) and Qwen2 (q/k/v biases): the compiled step's in-graph attention gives the
    eager greedy tokens in float32, across turns and past the window."""
    model = build_tiny_model(tmp_path / arch, smol_tokenizer, arch, **copy.deepcopy(extra))  # (the config edits it)
    config = json.loads((model / "config.json").read_text())
    eager = _run(_session(model, compile="eager"))
    s = _session(model, compile="on")
    assert s.backend._step is not None, s.backend.compile_status
    # exported and compiled ahead of time (q/k/v biases, LongRoPE, a window no shorter than the context); a sliding
    # window shorter than the context takes the torch.compile step (torch.export cannot bound the window's slice),
    # saying why
    step, build = s.backend._step, s.backend._build
    short_window = extra.get("sliding_window", 10**9) < 512
    assert step.kind == ("jit" if short_window else "aot"), build.aot_error
    if short_window:
        assert "sliding window" in build.aot_error and step.direct is not None
    assert _run(s) == eager
    if short_window:
        assert len(s.ledger) > 2 * extra["sliding_window"]  # the window really cut keys out
    if "rope_parameters" in extra:
        assert config["rope_parameters"]["rope_type"] == "longrope" and config["original_max_position_embeddings"] == 64
        assert len(s.ledger) > 2 * 64  # decoded past the switch to the long factors


def test_compiled_step_then_truncate_and_shift(tiny_model, eager_ids):
    """After compiled steps, crop (ledger divergence) and shift (memory policy) still work on the same cache."""
    s = _session(tiny_model, compile="on")
    s.run_turn(TURNS[0])
    b = s.backend
    n = b.cached_tokens()
    assert b.shift(4, 3) is None
    assert b.cached_tokens() == n - 3
    s.reset()
    assert _run(s) == eager_ids


def test_compile_failure_falls_back_to_eager_and_says_why(tiny_model, eager_ids):
    # a torch.compile backend that does not exist: torch raises, the backend stays eager and reports it
    # (handed to the backend factory directly: RunConfig's validation would refuse the value before any load)
    from fmchat import backends

    s = _session(tiny_model, loader=backends.load, compile="no-such-compiler")
    b = s.backend
    assert b._step is None
    assert b.compile_status.startswith("eager: compile failed (")
    assert "no-such-compiler" in b.compile_status
    assert _run(s) == eager_ids
    assert s.messages[-1].stats.decode_path == b.compile_status


def test_default_is_auto_and_eager_is_plain_eager(tiny_model, monkeypatch):
    """The default decode path is ``auto`` (tests/test_decode_auto.py); ``eager`` (and its old name ``off``) is the
    plain eager path on the kernel asked for, with no compile started."""
    assert RunConfig().compile == "auto"
    for name in ("eager", "off"):
        b = _session(tiny_model, compile=name).backend
        assert b.compile_status == "off" and b.decode_path == "eager" and b._build is None and b.kernel == "sdpa"


def test_bench_decode_reports_every_column(tiny_model, capsys):
    from fmchat.bench.decode import COLUMNS, bench_decode

    res = bench_decode(str(tiny_model), contexts=[16, 48], new_tokens=4, ttft_tokens=32, configs=["generate()", "eager", "compiled", "compiled+int8"],
                       llamacpp_model=None, dtype="float32", json_out=True, read_mb=64)  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(res))
    assert out["read_gb_s"] > 0
    labels = [r["config"] for r in out["rows"]]
    assert labels == ["generate()", "eager", "compiled", "compiled+int8"]
    for r in out["rows"]:
        assert set(COLUMNS) <= set(r), r
        for c in (16, 48):
            assert r["decode_tok_s"][str(c)] > 0
        assert r["ttft_ms"] > 0 and r["weights_bytes"] > 0 and r["bound_tok_s"] > 0
    assert out["rows"][2]["decode_path"].startswith("compiled")
    assert out["rows"][3]["decode_path"].startswith("compiled")  # int8 packed matmuls compile too (custom ops)


def test_threads_default_is_physical_cores():
    from fmchat.engine.session import default_threads, set_threads

    before = torch.get_num_threads()
    try:
        set_threads(None)
        assert torch.get_num_threads() == default_threads() >= 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,quant", [("bfloat16", "none"), ("float32", "int8")])
def test_compiled_step_tracks_eager(tiny_model, dtype, quant):
    """bf16 weights (the DecodeLinear GEMVs) and int8 weights inside the compiled step. Its one-row products round
    differently from the eager ones (bf16: oneDNN; int8: the packed kernel eagerly, the fused loop or the packed
    kernel in the step, whichever the kernel selection measured faster here; even in float32 activations the two
    int8 kernels sum in another order): measured 0.6-1.2% of the largest logit on this model in bf16, whose top two
    logits are often closer than that, so greedy tokens are compared only where the eager margin exceeds twice the
    difference."""
    from fmchat.backends.transformers.compiled import DecodeLinear

    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype=dtype, quant=quant, kernel="fmc", ctx=256,
                               compile="on"))  # fmt: skip
    assert b._step is not None, b.compile_status
    assert b.decode_path.startswith("compiled")
    if quant == "none":
        assert any(isinstance(m, DecodeLinear) for m in b.model.modules())
    ids = list(range(100, 140))
    step, token, compared = b._step, 7, 0
    for _ in range(12):
        b.truncate(0)
        b._step = None  # eager: the same model, the same fmc cache
        b.forward(ids)
        eager = b.forward([token])
        b.truncate(0)
        b._step = step
        b.forward(ids)
        compiled = b.forward([token])
        scale, diff = eager.abs().max(), (compiled - eager).abs().max()
        assert diff <= 0.02 * scale, (diff, scale)
        top2 = eager.topk(2).values
        if top2[0] - top2[1] > 2 * diff:
            compared += 1
            assert int(compiled.argmax()) == int(eager.argmax())
        ids.append(token)
        token = int(eager.argmax())
    assert compared >= 3


def test_phi35s_own_config_shrunk_in_bf16_int8_is_compiled_ahead_of_time(tmp_path, smol_tokenizer):
    """Phi-3.5-mini's shipped config (fmchat/shapes/phi-3.5.json: LongRoPE with its 48 factors, the 262144-token
    window), shrunk to 2 layers of 384, in its usual load (bf16, int8 weights) takes the ahead-of-time step. LongRoPE's
    tensor attribute (long_inv_freq) once became an unnamed constant of the head program that no model tensor could
    be bound to, and the build fell back to torch.compile (seen in bench shape phi-3.5)."""
    from transformers import AutoModelForCausalLM, Phi3Config

    shape = json.loads((REPO_SHAPES / "phi-3.5.json").read_text())
    cfg = dict(shape.get("config", shape))
    cfg.pop("auto_map", None)
    cfg.update(hidden_size=384, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               vocab_size=len(smol_tokenizer), bos_token_id=smol_tokenizer.bos_token_id,
               eos_token_id=smol_tokenizer.eos_token_id, pad_token_id=smol_tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Phi3Config(**cfg)).save_pretrained(tmp_path / "phi35")
    smol_tokenizer.save_pretrained(tmp_path / "phi35")
    s = _session(tmp_path / "phi35", compile="on", dtype="bfloat16", quant="int8", ctx=1048)
    step, build = s.backend._step, s.backend._build
    assert step is not None and step.kind == "aot", (s.backend.compile_status, build.aot_error)
    s.run_turn(TURNS[0])
    assert s.messages[-1].stats.decode_path.startswith("compiled (inductor AOT, ")

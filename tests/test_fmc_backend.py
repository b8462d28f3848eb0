"""--kernel fmc end to end on tiny Llama / Qwen2 / Phi-3 models: same logits and greedy replies as sdpa (float32)."""

from __future__ import annotations

import pytest
import torch

from fmchat.backends.transformers.fmc import FmcCache
from fmchat.config import RunConfig
from fmchat.conversation import load_backend

ARCHS = ["llama", "qwen2", "phi3"]
LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)  # float32 end to end; only the summation order differs from sdpa
CTX = 128


def load(path, kernel, ctx=CTX):
    return load_backend(RunConfig(model=str(path), device="cpu", dtype="float32", ctx=ctx, kernel=kernel))


@pytest.fixture(scope="module")
def pairs(tiny_models):
    return {arch: (load(tiny_models[arch], "sdpa"), load(tiny_models[arch], "fmc")) for arch in ARCHS}


def _ids(n, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_sdpa_prefill_after_cache_decode_and_truncate(pairs, arch):
    ref, fmc = pairs[arch]
    assert isinstance(fmc.cache, FmcCache)
    ids = _ids(45)
    for b in (ref, fmc):
        b.truncate(0)
    steps = [ids[:20], ids[20:37]] + [[t] for t in ids[37:42]]  # prefill, prefill after cache, 5 decode steps
    for chunk in steps:
        torch.testing.assert_close(fmc.forward(chunk), ref.forward(chunk), **LOGIT_TOL)
    assert fmc.cached_tokens() == ref.cached_tokens() == 42
    assert fmc.seq_lens() == [42]
    # Crop back into the middle and continue: the stale K/V left past the fill must not be read.
    for b in (ref, fmc):
        b.truncate(15)
    assert fmc.seq_lens() == [15] and fmc.cache.seq_lens.tolist() == [15]
    for chunk in (ids[30:40], [ids[44]]):
        torch.testing.assert_close(fmc.forward(chunk), ref.forward(chunk), **LOGIT_TOL)
    assert fmc.cached_tokens() == 26


def test_cache_is_preallocated_and_reused(pairs, tiny_models):
    ref, fmc = pairs["llama"]
    cfg = fmc.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    want = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * CTX * head_dim * 4
    fresh = load(tiny_models["llama"], "fmc")
    assert fresh.kv_bytes() == want  # held from the start: the whole window is reserved at load
    assert fresh.seq_lens() == [0]
    ptr = fresh.cache.layers[0].keys.data_ptr()
    fresh.forward(_ids(30, seed=1))
    fresh.truncate(0)
    fresh.forward(_ids(7, seed=2))
    assert fresh.kv_bytes() == want and fresh.cache.layers[0].keys.data_ptr() == ptr
    assert fresh.seq_lens() == [7]


def test_overflowing_the_window_raises(tiny_models):
    b = load(tiny_models["llama"], "fmc", ctx=16)
    b.forward(_ids(10))
    with pytest.raises(ValueError, match="full"):
        b.forward(_ids(7))


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_session_replies_identical_to_sdpa(pairs, arch):
    from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

    replies = {}
    for backend in pairs[arch]:
        cfg = SessionConfig(gen=GenerationConfig(max_new_tokens=10, temperature=0.0, seed=0))
        session = ChatSession(backend, cfg)
        out = []
        for text in ("Hello there", "Tell me more about caches", "And again?"):
            done = session.run_turn(text)
            out.append((done.stats.finish_reason, session.messages[-1].token_ids))
            assert done.stats.seq_lens == [len(session.ledger)]
        # Editing history crops the cache in the middle: the next turn reuses the common prefix only.
        session.pop_last_exchange()
        done = session.run_turn("Something else")
        assert 0 < done.stats.reused_tokens < done.stats.prompt_tokens
        out.append((done.stats.finish_reason, session.messages[-1].token_ids))
        replies[backend.kernel] = out
    assert replies["fmc"] == replies["sdpa"]
    assert any(ids for _, ids in replies["fmc"])


def test_bench_kernels_cli_reports_every_kernel(tiny_model):
    """`fmchat bench kernels --json` through the CLI: a decode-attention row per kernel at every context (each
    agreeing with SDPA), and an end-to-end row per --kernel, the compiled step really compiled."""
    import json

    from typer.testing import CliRunner

    from fmchat.cli import app

    res = CliRunner().invoke(app, ["bench", "kernels", "--model", str(tiny_model), "--contexts", "16,100", "--e2e-contexts", "16,40",
                                   "--new-tokens", "3", "--rounds", "1", "--iters", "2", "--dtype", "float32", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = out["attention"]["rows"]
    assert {r["impl"] for r in rows} == {"sdpa", "eager", "fmc", "fmc-ragged", "fmc-fused"}
    for r in rows:
        assert r["ctx"] in (16, 100) and r["ms"] > 0
        assert r["max_abs_diff"] < 1e-5, r  # fp32: every kernel computes the same attention
    e2e = {r["config"]: r for r in out["end_to_end"]["rows"]}
    assert list(e2e) == ["sdpa", "eager", "fmc", "fmc + compiled step"]
    assert e2e["fmc + compiled step"]["decode_path"].startswith("compiled")
    for r in e2e.values():
        assert r["decode_tok_s"]["16"] > 0 and r["decode_tok_s"]["40"] > 0 and r["ttft_ms"] > 0


def test_bench_kernels_cli_rejects_bad_rows(tiny_model):
    from typer.testing import CliRunner

    from fmchat.cli import app

    res = CliRunner().invoke(app, ["bench", "kernels", "--model", str(tiny_model), "--configs", "sdpa,warp"])
    assert res.exit_code != 0
    assert "unknown kernel row 'warp'" in res.output and "Traceback" not in res.output

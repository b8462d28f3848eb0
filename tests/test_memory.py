"""Memory policies: what is exact about `shift`, bounded memory, visible actions, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_scripted_model, build_tiny_model, make_session
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

from fmchat.cli import app
from fmchat.config import RunConfig
from fmchat.context.policies import unsupported_claims
from fmchat.conversation import load_backend

runner = CliRunner()
ARCHS = ["llama", "qwen2", "phi3"]


def load(model_dir, **kw):
    return load_backend(RunConfig(model=str(model_dir), device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def one_layer_models(tmp_path_factory, smol_tokenizer):
    out = {}
    for arch in ARCHS:
        out[arch] = build_tiny_model(tmp_path_factory.mktemp(f"one-layer-{arch}"), smol_tokenizer, arch, layers=1)
    return out


def sample_ids(backend, n=60):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    return backend.render([{"role": "user", "content": text}])[:n]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["sdpa", "fmc"])
def test_one_layer_shift_equals_a_fresh_prefill_of_the_kept_tokens(one_layer_models, arch, kernel):
    b = load(one_layer_models[arch], kernel=kernel, ctx=128)
    ids = sample_ids(b)
    keep, drop, nxt = 6, 17, ids[-1]
    b.forward(ids[:-1])
    assert b.shift(keep, drop) is None
    assert b.cached_tokens() == len(ids) - 1 - drop
    shifted = b.forward([nxt])
    b.truncate(0)
    fresh = b.forward(ids[:keep] + ids[keep + drop : -1] + [nxt])
    torch.testing.assert_close(shifted, fresh, atol=2e-5, rtol=1e-5)


def capture_pre_rope_keys(model, arch):
    """Forward hooks that record each layer's keys before RoPE, as [B, H_kv, S, D]."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    got, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(mod, inp, out, i=i):
            if arch == "phi3":  # fused qkv: [q | k | v]
                q_size = cfg.num_attention_heads * head_dim
                out = out[..., q_size : q_size + cfg.num_key_value_heads * head_dim]
            b, s, _ = out.shape
            got.setdefault(i, []).append(out.view(b, s, -1, head_dim).transpose(1, 2))

        proj = attn.qkv_proj if arch == "phi3" else attn.k_proj
        hooks.append(proj.register_forward_hook(hook))
    return got, hooks


def rope_at(model, keys, positions):
    cos, sin = model.model.rotary_emb(keys, torch.tensor([positions]))
    _, k = apply_rotary_pos_emb(keys, keys, cos, sin)
    return k


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_layer_shift_rotates_keys_exactly_and_keeps_values(tiny_models, arch):
    b = load(tiny_models[arch], ctx=256)
    model = b.model
    ids = sample_ids(b, 80)
    got, hooks = capture_pre_rope_keys(model, arch)
    try:
        b.forward(ids[:50])
        pre = {i: torch.cat(v, dim=2) for i, v in got.items()}  # pre-RoPE keys of the 50 tokens, per layer
        values_before = [layer.values.clone() for layer in b.cache.layers]
        positions = list(range(50))
        for keep, drop in [(4, 10), (4, 7), (6, 5)]:  # several consecutive shifts
            assert b.shift(keep, drop) is None
            positions = positions[:keep] + positions[keep + drop :]
            for i in pre:
                pre[i] = torch.cat((pre[i][:, :, :keep], pre[i][:, :, keep + drop :]), dim=2)
            values_before = [torch.cat((v[:, :, :keep], v[:, :, keep + drop :]), dim=2) for v in values_before]
        n = len(positions)
        assert b.cached_tokens() == n == 50 - 22
        for i, layer in enumerate(b.cache.layers):
            expected = rope_at(model, pre[i], list(range(n)))  # RoPE applied directly at the new positions
            torch.testing.assert_close(layer.keys, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(layer.values, values_before[i])  # values untouched
        # positions continue: the next token's key is rotated for position n
        for v in got.values():
            v.clear()
        b.forward([ids[50]])
        for i, layer in enumerate(b.cache.layers):
            torch.testing.assert_close(layer.keys[:, :, n:], rope_at(model, got[i][0], [n]), atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_shift_is_refused_where_rope_math_does_not_allow_it(tmp_path, smol_tokenizer):
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    path = build_tiny_model(tmp_path / "dyn", smol_tokenizer, rope_parameters=dynamic)
    s = make_session(path, ctx=160, max_new_tokens=16)
    s.config.memory = "shift"
    actions = [s.run_turn(f"Turn {i}: tell me about the sea and the sky.").stats for i in range(8)]
    acted = [a for a in actions if a.memory_action]
    assert acted and all(a.memory_action == "dropped" for a in acted)
    assert "fell back to sliding" in acted[0].memory_note and "dynamic" in acted[0].memory_note


@pytest.mark.parametrize("policy", ["sliding", "shift", "summary"])
def test_policies_keep_the_window_bounded_and_say_what_they_did(tiny_model, policy):
    ctx = 192
    s = make_session(tiny_model, ctx=ctx, max_new_tokens=20, system="The user's name is Ada.")
    s.config.memory = policy
    cfg = s.backend.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    stats = [s.run_turn(f"Turn {i}: tell me something about the sea.").stats for i in range(14)]
    for st in stats:
        assert st.ctx_used <= ctx and st.kv_bytes <= ctx * per_token
        assert s.backend.cached_tokens() == len(s.ledger)
    acted = [st for st in stats if st.memory_action]
    assert len(acted) >= 3
    for st in acted:
        assert st.evicted_tokens > 0 and st.kv_fill_before is not None and st.kv_fill_after < st.kv_fill_before
        assert st.memory_note
    assert s.messages[0].content.startswith("Turn 0")  # dropped turns stay in the transcript
    assert s.window_start > 0
    sys_prompt = s.template_messages()[0]
    assert sys_prompt["role"] == "system" and "Ada" in sys_prompt["content"]  # never dropped
    if policy == "shift":
        assert all(st.memory_action == "shifted" for st in acted)
        # nothing old is re-prefilled: only the new turn (and the re-rendered end of the last reply)
        assert max(st.prefilled_tokens for st in acted) < 64
    if policy == "sliding":
        assert all(st.memory_action == "dropped" for st in acted)
        assert min(st.prefilled_tokens for st in acted) > ctx // 2  # the kept window is re-prefilled
    if policy == "summary":  # a random model's summary names things the turns did not: rejected, turns dropped
        assert all("; summary rejected (it names " in st.memory_note for st in acted), acted[0].memory_note


def test_unsupported_claims_catches_new_names_and_numbers():
    source = "user: My cat Tom is 3 years old.\nassistant: Tom sounds lovely."
    assert unsupported_claims("The user has a cat named Tom, aged 3.", source) == []
    assert unsupported_claims("The user has a cat named Felix.", source) == ["Felix"]
    assert unsupported_claims("Tom is 7 years old.", source) == ["7"]


def test_cli_memory_policies(tiny_model, tmp_path):
    script = tmp_path / "long.json"
    script.write_text(json.dumps({"turns": [f"Turn {i}: tell me about the sea." for i in range(12)]}))
    base = ["run", "--model", str(tiny_model), "--ctx", "192", "--max-new-tokens", "20", "--temperature", "0", "--script", str(script)]
    r = runner.invoke(app, [*base, "--memory", "shift", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12 and all(row["ctx_used"] <= 192 for row in rows)
    assert any(row["memory_action"] == "shifted" for row in rows)
    r = runner.invoke(app, [*base, "--memory", "none"])
    assert r.exit_code == 2 and "choose a memory policy" in r.stderr
    r = runner.invoke(app, [*base, "--memory", "forget"])
    assert r.exit_code == 2 and "unknown memory policy 'forget'" in r.stderr


def test_bench_memory_reports_each_policy(tiny_model, tmp_path):
    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"turns": ["Tell me about the sea.", "And the sky?"]}))
    r = runner.invoke(app, ["bench", "memory", "--model", str(tiny_model), "--ctx", "160", "--turns", "10", "--max-new-tokens", "16",
                            "--script", str(script), "--policies", "none,sliding,shift", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = {p["policy"]: p for p in json.loads(r.stdout.splitlines()[-1])["policies"]}
    assert res["none"]["stopped"] is not None and res["none"]["turns_completed"] < 10
    for p in ("sliding", "shift"):
        assert res[p]["turns_completed"] == 10 and res[p]["max_ctx_used"] <= 160 and res[p]["actions"] > 0
        assert res[p]["recall"] in (True, False) and res[p]["continuation_ppl"] > 1
    assert res["shift"]["prefilled_median_after"] < res["sliding"]["prefilled_median_after"]


def test_llamacpp_uses_its_own_kv_shift(default_gguf, tmp_path):
    script = tmp_path / "long.json"
    script.write_text(json.dumps({"turns": [f"Turn {i}: name a fruit." for i in range(10)]}))
    r = runner.invoke(app, ["run", "--backend", "llamacpp", "--ctx", "256", "--memory", "shift", "--max-new-tokens", "24",
                            "--temperature", "0", "--script", str(script), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 10 and all(row["ctx_used"] <= 256 for row in rows)
    shifted = [row for row in rows if row["memory_action"] == "shifted"]
    assert shifted and all(row["reused_tokens"] > row["prefilled_tokens"] for row in shifted)


def test_summary_policy_keeps_a_valid_summary_in_the_window(smol_tokenizer, tmp_path):
    """The accepted path: a model scripted to answer with a note that names nothing new; the dropped turns are
    summarized into the memory note, which the next prompts carry after the system prompt."""
    note = "user asked about sea and sky."
    path = build_scripted_model(tmp_path / "scripted", smol_tokenizer, note)
    s = make_session(path, ctx=192, max_new_tokens=16, system="Be brief.")
    s.config.memory = "summary"
    stats = [s.run_turn(f"Turn {i}: tell me about the sea and the sky.").stats for i in range(12)]
    assert s.messages[1].content == note  # the script: every reply is the note
    acted = [st for st in stats if st.memory_action]
    assert acted and all(st.memory_action == "summarized" for st in acted)
    assert all(st.memory_note.endswith(f"summarized; {note}") for st in acted), acted[0].memory_note
    assert all(st.summarized_tokens == st.evicted_tokens > 0 for st in acted)
    system = s.template_messages()[0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.") and note in system["content"]
    assert all(st.ctx_used <= 192 for st in stats)


def test_an_empty_summary_is_rejected_and_says_so(smol_tokenizer, tmp_path):
    """(A note naming things the turns did not is the random model's case in the test above.)"""
    why = "summary rejected (the model wrote nothing)"
    path = build_scripted_model(tmp_path / "scripted", smol_tokenizer, "")
    s = make_session(path, ctx=192, max_new_tokens=16)
    s.config.memory = "summary"
    acted = [st for st in (s.run_turn(f"Turn {i}: tell me about the sea.").stats for i in range(12)) if st.memory_action]
    assert acted and all(st.memory_action == "dropped" for st in acted)
    assert all(st.memory_note.endswith(f" dropped; {why}; turns dropped instead") for st in acted), acted[0].memory_note


def test_summary_is_skipped_when_the_window_cannot_hold_the_request(tiny_model):
    s = make_session(tiny_model, ctx=96, max_new_tokens=8)
    s.config.memory = "summary"
    acted = [st for st in (s.run_turn(f"Turn {i}: the sea.").stats for i in range(10)) if st.memory_action]
    assert acted and all(st.memory_action == "dropped" for st in acted)
    assert all("; summary skipped (asking for it takes " in st.memory_note for st in acted), acted[0].memory_note
    assert all("more than the 96-token window" in st.memory_note for st in acted)

"""`shift` on hybrid models: every layer type moves with its own RoPE; sliding-window layers hold only their window.

Tiny Gemma 3-style models (sliding-window layers: RoPE base 10k; global layers: base 1M with linear scaling x8) and
Cohere 2-style ones (interleaved RoPE on sliding-window layers, none on global layers), random weights, float32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from transformers.models.cohere2 import modeling_cohere2
from transformers.models.gemma3 import modeling_gemma3

from fmchat.backends.transformers.rope import layer_ropes
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

ARCHS = ["gemma3", "cohere2"]
WINDOW = 16  # sliding_window of the tiny models (conftest)


def load(model_dir, **kw):
    return load_backend(RunConfig(model=str(model_dir), device="cpu", dtype="float32", **kw))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, smol_tokenizer):
    """4 layers: sliding, global, sliding, global."""
    return {arch: build_tiny_model(tmp_path_factory.mktemp(f"hybrid-{arch}"), smol_tokenizer, arch, layers=4)
            for arch in ARCHS}  # fmt: skip


@pytest.fixture(scope="module")
def hybrid_backend(hybrid):
    """One loaded backend per (arch, kernel), ctx 256, handed out with an empty cache."""
    loaded = {}

    def get(arch, kernel):
        if (arch, kernel) not in loaded:
            loaded[arch, kernel] = load(hybrid[arch], kernel=kernel, ctx=256)
        b = loaded[arch, kernel]
        b.truncate(0)
        return b

    return get


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory, smol_tokenizer):
    out = {}
    for arch in ARCHS:
        for kind in ("sliding_attention", "full_attention"):
            path = tmp_path_factory.mktemp(f"one-{arch}-{kind}")
            out[arch, kind] = build_tiny_model(path, smol_tokenizer, arch, layers=1, layer_types=[kind])
    return out


def sample_ids(backend, n):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = backend.render([{"role": "user", "content": text}])[:n]
    assert len(ids) == n
    return ids


def capture_pre_rope_keys(model, arch):
    """Hooks recording each layer's keys just before RoPE, as [B, H_kv, S, D] (Gemma 3: after its k_norm)."""
    got, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(mod, inp, out, i=i, attn=attn):
            if arch == "cohere2":  # k_proj output [B, S, H*D]
                b, s, _ = out.shape
                out = out.view(b, s, -1, attn.head_dim).transpose(1, 2)
            got.setdefault(i, []).append(out)

        hooks.append((attn.k_norm if arch == "gemma3" else attn.k_proj).register_forward_hook(hook))
    return got, hooks


def rope_at(model, arch, i, keys, positions):
    """RoPE applied directly at ``positions`` with layer ``i``'s own rotary parameters (the model's own code)."""
    kind = model.config.layer_types[i]
    pos = torch.tensor([positions])
    if arch == "gemma3":
        cos, sin = model.model.rotary_emb(keys, pos, kind)
        return modeling_gemma3.apply_rotary_pos_emb(keys, keys, cos, sin)[1]
    if kind == "full_attention":  # Cohere 2's global layers have no RoPE
        return keys
    cos, sin = model.model.rotary_emb(keys, pos)
    return modeling_cohere2.apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def cells(backend, layer):
    """The cached keys/values a layer holds: fmc buffers are preallocated, cut them at the fill."""
    if backend.kernel == "fmc":
        n = backend.cached_tokens()
        return layer.keys[:, :, :n], layer.values[:, :, :n]
    return layer.keys, layer.values


def test_each_layer_type_has_its_own_rope(hybrid_backend):
    g = layer_ropes(hybrid_backend("gemma3", "sdpa").model)
    assert [r.layer_type for r in g] == ["sliding_attention", "full_attention"] * 2
    assert [r.kind for r in g] == ["default", "linear"] * 2 and {r.layout for r in g} == {"half"}
    base = 1.0 / 10_000.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(g[0].inv_freq, base)
    torch.testing.assert_close(g[1].inv_freq, 1.0 / 1_000_000.0 ** (torch.arange(0, 16, 2).float() / 16) / 8)
    c = layer_ropes(hybrid_backend("cohere2", "sdpa").model)
    assert [r.kind for r in c] == ["default", "none"] * 2 and c[1].inv_freq is None and c[0].layout == "interleaved"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["sdpa", "fmc"])
@pytest.mark.parametrize(
    ("n_tokens", "shifts"),
    [
        (50, [(4, 10), (4, 7), (6, 5)]),  # the discarded ranges lie before the sliding layers' window
        (40, [(4, 21)]),  # the window's first cell lands exactly on n_keep
        (12, [(2, 5)]),  # fewer tokens than the window: nothing was evicted yet
    ],
)
def test_shifted_keys_equal_rope_at_the_new_positions_on_every_layer(hybrid_backend, arch, kernel, n_tokens, shifts):
    b = hybrid_backend(arch, kernel)
    model = b.model
    ids = sample_ids(b, n_tokens + 1)
    got, hooks = capture_pre_rope_keys(model, arch)
    try:
        b.forward(ids[:n_tokens])
        pre = {i: torch.cat(v, dim=2) for i, v in got.items()}  # pre-RoPE keys of every position, per layer
        before = [cells(b, layer)[1].clone() for layer in b.cache.layers]
        firsts = [n_tokens - v.shape[2] for v in before]  # position of each layer's first cell
        positions = list(range(n_tokens))
        for keep, drop in shifts:
            assert b.shift(keep, drop) is None
            positions = positions[:keep] + positions[keep + drop :]
            pre = {i: torch.cat((k[:, :, :keep], k[:, :, keep + drop :]), dim=2) for i, k in pre.items()}
            for i, v in enumerate(before):  # values: the same cells without the discarded positions
                a, z = min(max(keep - firsts[i], 0), v.shape[2]), min(max(keep + drop - firsts[i], 0), v.shape[2])
                before[i] = torch.cat((v[:, :, :a], v[:, :, z:]), dim=2)
                firsts[i] = firsts[i] if firsts[i] <= keep else max(keep, firsts[i] - drop)
        n = len(positions)
        assert b.cached_tokens() == n
        for i, layer in enumerate(b.cache.layers):
            k, v = cells(b, layer)
            held = k.shape[2]
            assert held == n  # sliding-window layers too: a cell for every position (the masks apply the window)
            expected = rope_at(model, arch, i, pre[i], list(range(n)))
            torch.testing.assert_close(k, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(v, before[i])  # values are never rotated
        # positions continue: the next token's key, in every layer, is rotated for position n
        for v in got.values():
            v.clear()
        b.forward([ids[n_tokens]])
        for i, layer in enumerate(b.cache.layers):
            k, _ = cells(b, layer)
            torch.testing.assert_close(k[:, :, -1:], rope_at(model, arch, i, got[i][0], [n]), atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
@pytest.mark.parametrize("kernel", ["sdpa", "fmc"])
def test_one_layer_shift_equals_a_fresh_prefill_of_the_kept_tokens(one_layer, arch, kind, kernel):
    """With one layer, a key depends only on its token and position: the shifted cache must equal, cell for cell,
    the cache of a fresh prefill of the kept tokens, and the next logits must match."""
    b = load(one_layer[arch, kind], kernel=kernel, ctx=128)
    ids = sample_ids(b, 60)
    keep, drop, nxt = 6, 17, ids[-1]
    b.forward(ids[:-1])
    assert b.shift(keep, drop) is None
    assert b.cached_tokens() == len(ids) - 1 - drop
    shifted = b.forward([nxt])
    shifted_kv = [tuple(t.clone() for t in cells(b, layer)) for layer in b.cache.layers]
    b.truncate(0)
    fresh = b.forward(ids[:keep] + ids[keep + drop : -1] + [nxt])
    torch.testing.assert_close(shifted, fresh, atol=2e-5, rtol=1e-5)
    for (k, v), layer in zip(shifted_kv, b.cache.layers):
        fk, fv = cells(b, layer)
        assert k.shape == fk.shape
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


def test_past_the_window_the_cache_crops_and_shifts_and_still_applies_the_window(hybrid_backend, one_layer):
    """40 tokens through a model whose sliding layers see 16: transformers' own sliding cache layers keep only the
    last 15 and raised on a crop (a retry or an edit); fmchat's caches keep every cell, so a crop and a shift that
    reaches into the window both work, and the logits still equal the model run without any cache (where the sliding
    mask alone limits what each layer sees)."""
    for kernel in ("sdpa", "fmc"):
        b = hybrid_backend("gemma3", kernel)
        ids = sample_ids(b, 45)

        def uncached(model, tokens):
            with torch.inference_mode():
                return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()

        b.truncate(0)
        b.forward(ids[:40])
        b.truncate(30)  # a retry after the window has filled
        assert b.cached_tokens() == 30
        torch.testing.assert_close(b.forward(ids[30:35]), uncached(b.model, ids[:35]), atol=2e-5, rtol=1e-5)
        # One sliding layer (its keys depend only on token and position, so a shift is exactly a fresh prefill):
        b = load(one_layer["gemma3", "sliding_attention"], kernel=kernel, ctx=128)
        b.forward(ids[:40])
        assert b.shift(4, 22) is None and b.cached_tokens() == 18  # the window of the next token needs shifted cells
        kept = ids[:4] + ids[26:40]
        torch.testing.assert_close(b.forward([ids[40]]), uncached(b.model, [*kept, ids[40]]), atol=2e-5, rtol=1e-5)


def test_a_layer_type_whose_rope_grows_with_the_length_refuses_the_shift(tmp_path, smol_tokenizer):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1_000_000.0}}  # fmt: skip
    b = load(build_tiny_model(tmp_path / "dyn", smol_tokenizer, "gemma3", rope_parameters=rope), ctx=128)
    b.forward(sample_ids(b, 30))
    reason = b.shift(4, 10)
    assert reason == "RoPE type 'dynamic' on full_attention layers changes its frequencies with the sequence length"
    assert b.cached_tokens() == 30


@pytest.mark.parametrize("kernel", ["fmc", "sdpa"])
def test_chat_with_memory_shift_shifts_every_layer_type(tmp_path, smol_tokenizer, kernel):
    """Through the session, as `--memory shift --ctx 160` runs it: every action is a shift, none falls back; the
    sliding layers' window (16) is far smaller than the context."""
    path = build_tiny_model(tmp_path / "g3", smol_tokenizer, "gemma3", sliding_window=WINDOW)  # sliding, global
    ctx = 160
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0, seed=0)
    config = SessionConfig(system="The user's name is Ada.", ctx=ctx, memory="shift", gen=gen)
    s = ChatSession(load(path, kernel=kernel, ctx=ctx), config)
    stats = [s.run_turn(f"Turn {i}: tell me something about the sea.").stats for i in range(8)]
    acted = [st for st in stats if st.memory_action]
    assert len(acted) >= 3
    assert all(st.memory_action == "shifted" and "fell back" not in st.memory_note for st in acted)
    assert all(st.ctx_used <= ctx for st in stats) and s.backend.cached_tokens() == len(s.ledger)
    assert max(st.prefilled_tokens for st in acted) < 64  # nothing old re-prefilled

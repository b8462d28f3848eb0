"""What the launch of ``fmchat run`` skips or defers before its first token must not change what it computes:

* the fmc cache is allocated without zeroing (positions past the fill are never read) and written with slice copies
  when every row has the same fill: the same logits and greedy tokens as sdpa, whatever the buffers held before;
* the mapped load builds a skeleton and maps the safetensors file into it instead of ``from_pretrained``: the same
  parameters, buffers, ties and config, and the parameters are the file's pages (one mapping, no copy);
* the default model's package is located without importing it (it imports llm and llama.cpp);
* the cyclic garbage collector is off while a launch loads and back on after it.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from conftest import build_tiny_model

from fmchat.config import RunConfig
from fmchat.conversation import load_backend


def _load(path, kernel="fmc", dtype="float32", ctx=96):
    return load_backend(RunConfig(model=str(path), device="cpu", dtype=dtype, ctx=ctx, kernel=kernel, compile="eager"))


def _greedy(backend, prompt, n):
    logits, out, all_logits = backend.forward(prompt), [], []
    for _ in range(n):
        all_logits.append(logits)
        token = int(torch.argmax(logits))
        out.append(token)
        logits = backend.forward([token])
    return out, all_logits


def test_unzeroed_fmc_cache_gives_the_same_tokens_whatever_it_held(tiny_model):
    ref, fmc = _load(tiny_model, "sdpa"), _load(tiny_model, "fmc")
    for layer in fmc.cache.layers:  # what an unzeroed allocation may hold: the kernels must never read it
        layer.keys.fill_(float("nan"))
        layer.values.fill_(float("inf"))
    prompt = list(range(20, 45))
    for turn in range(2):  # a second turn after a crop: the buffers past the fill hold stale tokens and NaN
        for b in (ref, fmc):
            b.truncate(10 * turn)
        want, want_logits = _greedy(ref, prompt[10 * turn :], 12)
        got, got_logits = _greedy(fmc, prompt[10 * turn :], 12)
        assert got == want
        for a, b in zip(got_logits, want_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert fmc.cache.seq_lens_list() == [fmc.cached_tokens()] and int(fmc.cache.seq_lens[0]) == fmc.cached_tokens()


@pytest.mark.parametrize("tied", [False, True])
def test_mapped_load_equals_from_pretrained_and_maps_the_file(tmp_path, smol_tokenizer, tied):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "m", smol_tokenizer, tie_word_embeddings=tied)
    b = _load(path, "sdpa")
    assert b.weights_load == "mapped"
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    got_p = dict(b.model.named_parameters(remove_duplicate=False))
    want_p = dict(ref.named_parameters(remove_duplicate=False))
    assert got_p.keys() == want_p.keys()
    for name, p in got_p.items():
        assert p.dtype == want_p[name].dtype and p.requires_grad == want_p[name].requires_grad, name
        assert torch.equal(p, want_p[name]), name
    got_b, want_b = dict(b.model.named_buffers()), dict(ref.named_buffers())
    assert got_b.keys() == want_b.keys()
    for name, t in got_b.items():
        assert t.dtype == want_b[name].dtype and torch.equal(t, want_b[name]), name
    assert (b.model.lm_head.weight is b.model.model.embed_tokens.weight) == tied
    assert b.model.config.to_dict() == ref.config.to_dict()
    assert b.model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert not b.model.training
    # the parameters are views of one mapping of the file, not copies
    assert len({p.untyped_storage().data_ptr() for p in b.model.parameters()}) == 1
    ids = torch.arange(5, 30).view(1, -1)
    with torch.inference_mode():
        assert torch.equal(b.model(ids).logits, ref(ids).logits)


def test_package_gguf_is_found_without_importing_its_package(tmp_path, monkeypatch):
    from fmchat import models

    pkg = tmp_path / "fmchat_fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    alias = models.Alias("fake", "a fake", package="fmchat_fake_gguf_pkg", package_glob="*.gguf")
    assert models._package_gguf(alias) == pkg / "model.gguf"
    assert "fmchat_fake_gguf_pkg" not in sys.modules
    assert models._package_dir("fmchat_no_such_package_here") is None


def test_default_model_resolves_without_loading_llama_cpp():
    import subprocess

    code = ("import sys; from fmchat import models; s = models.resolve(None); "
            "print(s.kind, s.path.name, 'llm' in sys.modules, 'llama_cpp' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "False", "False"]


def test_pause_gc_turns_the_collector_off_then_back_on(monkeypatch):
    import importlib

    app_module = importlib.import_module("fmchat.cli.app")  # the module (fmchat.cli.app is also the Typer app's name)

    assert gc.isenabled()
    resume = app_module.pause_gc()
    assert not gc.isenabled()
    assert app_module.pause_gc()() is None and not gc.isenabled()  # nested: a no-op, the outer one resumes
    resume()
    resume()  # idempotent
    assert gc.isenabled() and gc.get_freeze_count() == 0  # in-process (a test): nothing frozen
    monkeypatch.setattr(app_module, "FREEZE_GC_AFTER_STARTUP", True)
    try:
        app_module.pause_gc()()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()

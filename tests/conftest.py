"""Shared fixtures: isolated user dirs, the default model's tokenizer, and tiny random models built in code."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

# The two workers (pyproject's addopts) each run torch on both cores. OpenMP's threads spin while they wait for work
# (libgomp's default), and a spinning thread holds a core the other worker needs: two processes of small matmuls
# on 2 cores ran 412 it/s together spinning against 1200 waiting passively (one alone: 1068 vs 967). Set before
# torch (libgomp reads it once); children inherit it. The whole suite: 18.5 -> 11.8 min on this machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Isolate every platformdirs location (cache, config, data) for the whole test run, before fmchat is imported.
_OWN_ROOT = not os.environ.get("FMCHAT_TEST_HOME")  # a folder of our own is removed when the run ends
_ROOT = Path(os.environ.get("FMCHAT_TEST_HOME") or __import__("tempfile").mkdtemp(prefix="fmchat-tests-"))
for var, sub in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data")):
    os.environ[var] = str(_ROOT / sub)
os.environ["HF_HUB_OFFLINE"] = "1"
# Other tools' model stores (Ollama, LM Studio, llama.cpp) are found under $HOME or their own variables: a machine
# that really has some must not change what the tests see.
os.environ["HOME"] = str(_ROOT / "home")
(_ROOT / "home").mkdir(parents=True, exist_ok=True)
for var in ("OLLAMA_MODELS", "LLAMA_CACHE", "HF_HUB_CACHE", "HF_HOME"):
    os.environ.pop(var, None)
# The Triton kernel runs in Triton's interpreter where there is no GPU; it must be chosen before triton is imported.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The default decode path (auto) compiles the decode step in a background thread at every load: minutes of CPU per
# model a test loads. Tests get the eager path unless they ask (tests/test_decode_auto.py sets it to 1), and
# inductor's own cache stays torch's default (per test run) instead of fmchat's cache dir.
os.environ.setdefault("FMCHAT_AUTO_COMPILE", "0")
os.environ.setdefault("FMCHAT_INDUCTOR_DIR", "-")
# ... which is under this run's folder too, so that nothing the run compiled stays on the disk after it
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_ROOT / "inductor"))


def pytest_sessionfinish(session, exitstatus):
    """The run's converted models, compiled steps and inductor cache (a GB or more) go with it."""
    if _OWN_ROOT:
        __import__("shutil").rmtree(_ROOT, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
SHARED_SCRIPT = REPO.parent / "shared" / "bench" / "conversation.json"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from fmchat import models

    src = models.resolve(None)
    assert src.kind == "gguf" and src.path is not None
    return src.path


@pytest.fixture(scope="session")
def smol_tokenizer(default_gguf):
    """The real SmolLM2 tokenizer and chat template, read from the shipped GGUF (no weights converted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


def build_tiny_model(
    path: Path, tokenizer, arch: str = "llama", seed: int = 0, chat_template: str | None = None, layers: int = 2, **extra
) -> Path:
    """A small (2-layer by default) random model with the real tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, Cohere2Config, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,  # wider than the default so greedy logits are not all near-ties
    )
    if arch == "gemma3":  # hybrid: sliding-window and global layers, each type with its own RoPE (base, scaling)
        common.update(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
        )
    if arch == "cohere2":  # hybrid: RoPE (interleaved pairs) on sliding-window layers, none on global layers
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        common.update(sliding_window=16, layer_types=kinds)
    configs = {"llama": LlamaConfig, "phi3": Phi3Config, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig,
               "cohere2": Cohere2Config}  # fmt: skip
    cfg = configs[arch](**{**common, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smol_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    return {arch: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), smol_tokenizer, arch) for arch in ("llama", "phi3", "qwen2")}


def make_session(model_dir, *, kv_cache=True, max_new_tokens=12, temperature=0.0, dtype="float32", ctx=None, system=None, seed=0):
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend
    from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

    backend = load_backend(RunConfig(model=str(model_dir), device="cpu", dtype=dtype, ctx=ctx))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return ChatSession(backend, SessionConfig(system=system, kv_cache=kv_cache, ctx=ctx, gen=gen))


def build_scripted_model(path: Path, tokenizer, reply: str, seed: int = 0) -> Path:
    """A 1-layer Llama whose greedy reply to any chat prompt is ``reply`` (then end of turn): its attention and MLP
    write nothing back (zero output projections), so the last hidden state is the last token's embedding, and the
    output head maps each token of the chain (assistant header, the reply's tokens, end of turn) to the next one.
    The reply's tokens must be distinct, so the chain has no loop."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    start = tokenizer.encode(header, add_special_tokens=False)[-1]
    chain = [start, *tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), "the reply's tokens must be distinct (and differ from the header's last)"
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        emb = torch.randn(cfg.vocab_size, cfg.hidden_size)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
        for a, b in itertools.pairwise(chain):
            head[b] += 8 * emb[a] / emb[a].pow(2).mean().sqrt()  # the final RMSNorm scales each row to unit RMS
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def compile_recording_graphs(fn):
    """``fn`` compiled by inductor (fullgraph, static shapes) after a fresh ``torch._dynamo.reset()``, and the list
    its traced graphs are appended to as text (to check which kernel the trace called)."""
    import torch

    graphs: list[str] = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), graphs


# The files that take longest (the real models over the shared conversation, compiled steps) are handed out first:
# with pyproject's `-n 2 --dist loadfile`, left in name order they ran side by side at the end while the other
# worker had nothing left to do (22 min; 18.5 min in this order; 28 min in one process; 2 cores, 2026-12-02).
HEAVY_FIRST = ("test_e2e.py", "test_second_arch.py", "test_decode.py", "test_backends.py", "test_native_kernels.py",
               "test_decode_auto.py", "test_decode_aot.py", "test_kernels_attention.py", "test_quant.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order

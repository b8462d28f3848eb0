"""Random weights with the exact architecture of a ``config.json``, for `fmchat bench shape`.

What a model costs to load and run depends on its shapes and dtypes, not on the values of its weights, so a
model of a given shape can be measured without downloading it. The tensors (names, shapes) are the ones
transformers' own class for the config would load: the model is built on the ``meta`` device (no memory), its
state dict listed, and each tensor filled with seeded random bfloat16 values (norm weights 1, everything else
normal with the config's ``initializer_range``), written as safetensors shard by shard (one shard in memory at a
time). Tied output embeddings are not written, as a real checkpoint would not write them.

The directory is a complete Hugging Face model directory: ``config.json`` exactly as given, the shards and their
index, and SmolLM2's tokenizer and chat template (from the default model's GGUF: fmchat needs a tokenizer to load
a model, but `bench shape` feeds token ids below the model's vocabulary size directly, so which tokenizer it is does
not matter). Generated once per config, in ``<cache>/shapes/<model_type>-<hash of the config>/``; a finished directory
carries ``COMPLETE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GENERATOR_VERSION = 1  # bump when the files written here change: a new hash, a new directory
SHARD_BYTES = 1 << 30  # at most one shard (1 GiB of bfloat16) in memory while writing
COMPLETE = "COMPLETE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

Log = Callable[[str], None]


def config_hash(config: dict) -> str:
    """12 hex digits of the config's canonical JSON (and the generator's version)."""
    blob = json.dumps({"config": config, "generator": GENERATOR_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def shapes_root() -> Path:
    from fmchat.paths import cache_dir

    return cache_dir() / "shapes"


def weights_dir(config: dict) -> Path:
    """``<cache>/shapes/<model_type>-<hash>``: one directory per config, whatever name it was given."""
    kind = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(config.get("model_type", "")))[:40] or "model"
    return shapes_root() / f"{kind}-{config_hash(config)}"


def tensor_plan(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of this architecture holds, in the model's order; tied output
    embeddings left out. Built on the meta device: nothing is allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmchat.backends.transformers.gguf import quiet_transformers

    quiet_transformers()
    try:
        with tempfile.TemporaryDirectory(prefix="fmchat-shape-config-") as d:
            (Path(d) / "config.json").write_text(json.dumps(config))
            cfg = AutoConfig.from_pretrained(d)  # as the backend will read it
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, a config transformers rejects: one line
        from fmchat.errors import describe

        raise ValueError(f"transformers cannot build a causal LM from this config ({describe(exc)[:200]})") from None
    tied: set[str] = set()
    if getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        keys = getattr(model, "_tied_weights_keys", None) or {}
        tied = set(keys if isinstance(keys, (dict, list, tuple, set)) else [])
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n not in tied]


def _shards(plan: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in plan:
        n = 2 * _numel(shape)
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fill(name: str, shape: tuple[int, ...], std: float):
    import torch

    t = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and "norm" in name:
        return t.fill_(1.0)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return t.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def _tokenizer_files(log: Log) -> Path:
    """SmolLM2's tokenizer and chat template, read once from the default model's GGUF and kept in the cache."""
    out = shapes_root() / "tokenizer-smollm2"
    if (out / COMPLETE).is_file():
        return out
    from transformers import AutoTokenizer

    from fmchat import models
    from fmchat.backends.transformers.gguf import quiet_transformers

    quiet_transformers()
    src = models.resolve(None)
    assert src.path is not None
    log(f"reading SmolLM2's tokenizer from {src.path.name} (once)")
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    if not (tmp / "chat_template.jinja").is_file() and not tok.chat_template:
        raise RuntimeError("the default model's tokenizer has no chat template")
    (tmp / COMPLETE).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure_weights(config: dict, log: Log) -> tuple[Path, dict]:
    """The random-weights directory for ``config`` (generated if missing) and what generating it cost
    (``{"cached": True}`` when it was already there)."""
    from safetensors.torch import save_file

    out = weights_dir(config)
    marker = out / COMPLETE
    if marker.is_file():
        info = json.loads(marker.read_text())
        log(f"random weights: cached in {out}")
        return out, {**info, "cached": True}
    t0 = time.perf_counter()
    plan = tensor_plan(config)
    total = sum(2 * _numel(s) for _, s in plan)
    shards = _shards(plan)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.home()).free
    log(f"random weights: generating {total / 2**30:.2f} GiB of bfloat16 ({len(plan)} tensors, {len(shards)} shards) into {out}")
    if free < total * 1.05:
        raise RuntimeError(f"not enough disk for the random weights: {total / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
    tok = _tokenizer_files(log)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    std = float(config.get("initializer_range", 0.02) or 0.02)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        ts = time.perf_counter()
        tensors = {n: _fill(n, s, std) for n, s in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt", "fmchat": "random weights (bench shape)"})
        nbytes = sum(t.numel() * 2 for t in tensors.values())
        del tensors
        weight_map.update({n: fname for n, _ in shard})
        log(f"random weights: shard {i}/{len(shards)} ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - ts:.1f} s")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy2(tok / f, tmp / f)
    info = {"seconds": round(time.perf_counter() - t0, 1), "bytes": total, "tensors": len(plan), "shards": len(shards)}
    (tmp / COMPLETE).write_text(json.dumps(info))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"random weights: {total / 2**30:.2f} GiB written in {info['seconds']:.1f} s")
    return out, {**info, "cached": False}

"""A Q8_0 GGUF of `bench shape`'s random weights, for the llama.cpp row.

Written with the ``gguf`` package alone: its ``GGUFWriter`` (header and tensor infos first, then the tensors
one at a time, so only one tensor is in memory), its own tensor-name tables (``get_tensor_name_map`` over
``MODEL_TENSORS``) to name the Hugging Face tensors the way llama.cpp expects, and its Q8_0 quantizer
(``gguf.quants.quantize``) for every matrix whose rows are whole 32-value blocks (other matrices F16; vectors F32,
as llama.cpp's own converter writes them).

Architectures written natively: ``phi3`` (fused ``attn_qkv`` and gate+up ``ffn_up``, longrope's
``rope_factors_long``/``rope_factors_short``), ``qwen2`` (q/k/v biases, tied output) and ``llama`` (llama3 RoPE
scaling as ``rope_freqs``). The weights are random, so the Q/K row permutation llama.cpp's converter applies to
Llama checkpoints is not needed here (same shapes, same cost). Any other architecture, or one llama.cpp refuses, is
written as *a Llama model of the same size* (same layers, widths, heads, vocabulary; random values of its own), and
the report says so.

The vocabulary is synthetic (``tokenizer.ggml.model = llama``: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens,
then placeholders) and exactly the model's size: the bench feeds token ids, never text.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Log = Callable[[str], None]
NATIVE = ("phi3", "qwen2", "llama")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MOSTLY_Q8_0 = 7  # general.file_type


@dataclass(frozen=True)
class Dims:
    arch: str  # model_type
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    eps: float
    theta: float
    ctx: int

    @classmethod
    def of(cls, config: dict) -> Dims:
        c = dict(config.get("text_config") or {}) or config
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        rope = rope_params(c)
        return cls(
            arch=str(config.get("model_type", "")),
            layers=int(c["num_hidden_layers"]),
            hidden=hidden,
            ffn=int(c["intermediate_size"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            eps=float(c.get("rms_norm_eps") or c.get("layer_norm_eps") or 1e-5),
            theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
            ctx=int(c.get("max_position_embeddings") or 4096),
        )


def rope_params(c: dict) -> dict:
    """The RoPE settings, wherever this config keeps them (``rope_scaling`` before transformers 5, ``rope_parameters``
    since), with ``rope_type`` filled from the older ``type``."""
    r = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if "type" in r and "rope_type" not in r:
        r["rope_type"] = r["type"]
    return r


def gguf_path(weights: Path, as_llama: bool) -> Path:
    return weights / ("llamacpp-q8_0-as-llama.gguf" if as_llama else "llamacpp-q8_0.gguf")


# ---------------------------------------------------------------- where tensors come from
def _safetensors_index(weights: Path) -> dict[str, Path]:
    index = weights / "model.safetensors.index.json"
    if index.is_file():
        return {n: weights / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = weights / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return {n: single for n in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _read(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def _random(shape: tuple[int, ...], seed: int, norm: bool) -> np.ndarray:
    if norm:
        return np.ones(shape, dtype=np.float32)
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


def _native_tensors(weights: Path, d: Dims) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(GGUF name, shape, loader) for each tensor of the checkpoint, named through gguf's own tables."""
    import gguf
    from safetensors import safe_open

    arch = {"phi3": gguf.MODEL_ARCH.PHI3, "qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[d.arch]
    names = gguf.get_tensor_name_map(arch, d.layers)
    out = []
    for hf, path in _safetensors_index(weights).items():
        new = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for tensor {hf} in gguf's {d.arch} table")
        with safe_open(str(path), framework="pt") as f:
            shape = tuple(f.get_slice(hf).get_shape())
        out.append((new, shape, lambda p=path, n=hf: _read(p, n)))
    order = {n: i for i, n in enumerate(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch])}

    def key(item):  # global tensors first, then blocks in order (as llama.cpp's converter writes them)
        parts = item[0].split(".")
        if parts[0] == "blk":
            return (1, int(parts[1]), order.get("blk.{bid}." + parts[2], 99), item[0])
        return (0, 0, order.get(parts[0], 99), item[0])

    return sorted(out, key=key)


def _llama_tensors(d: Dims) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """A Llama model of the same size, with random values of its own."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    spec = [("token_embd.weight", (d.vocab, d.hidden)), ("output_norm.weight", (d.hidden,))]
    if not d.tied:
        spec.append(("output.weight", (d.vocab, d.hidden)))
    for b in range(d.layers):
        spec += [
            (f"blk.{b}.attn_norm.weight", (d.hidden,)),
            (f"blk.{b}.attn_q.weight", (q, d.hidden)),
            (f"blk.{b}.attn_k.weight", (kv, d.hidden)),
            (f"blk.{b}.attn_v.weight", (kv, d.hidden)),
            (f"blk.{b}.attn_output.weight", (d.hidden, q)),
            (f"blk.{b}.ffn_norm.weight", (d.hidden,)),
            (f"blk.{b}.ffn_gate.weight", (d.ffn, d.hidden)),
            (f"blk.{b}.ffn_up.weight", (d.ffn, d.hidden)),
            (f"blk.{b}.ffn_down.weight", (d.hidden, d.ffn)),
        ]
    return [(n, s, lambda s=s, i=i, n=n: _random(s, i, "norm" in n)) for i, (n, s) in enumerate(spec)]


def _rope_tensors(config: dict, d: Dims, as_llama: bool) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    c = dict(config.get("text_config") or {}) or config
    r = rope_params(c)
    kind = r.get("rope_type")
    if not as_llama and d.arch == "phi3" and kind in ("longrope", "su") and r.get("long_factor"):
        long_f = np.asarray(r["long_factor"], dtype=np.float32)
        short_f = np.asarray(r["short_factor"], dtype=np.float32)
        return [("rope_factors_long.weight", long_f.shape, lambda: long_f),
                ("rope_factors_short.weight", short_f.shape, lambda: short_f)]  # fmt: skip
    if d.arch == "llama" and kind == "llama3":
        f = llama3_rope_factors(d.head_dim, d.theta, r)
        return [("rope_freqs.weight", f.shape, lambda: f)]
    return []


def llama3_rope_factors(head_dim: int, theta: float, r: dict) -> np.ndarray:
    """Llama 3's RoPE scaling as per-frequency divisors (llama.cpp's ``rope_freqs``): 1 for short wavelengths,
    ``factor`` for long ones, a smooth blend between."""
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------- the file
def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    if n >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256  # BYTE
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]
    types += [1] * (n - len(types))  # NORMAL
    tokens, types = tokens[:n], types[:n]
    return tokens, [-float(i) for i in range(n)], types


def _kind(name: str, shape: tuple[int, ...]):
    import gguf

    if len(shape) >= 2 and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    if len(shape) >= 2:
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.F32


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return quantize(data, qtype)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return data.astype(np.float32)


def _nbytes(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], int]:
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == gguf.GGMLQuantizationType.Q8_0:
        b = quant_shape_to_byte_shape(shape, qtype)
        return b, int(np.prod(b))
    itemsize = 2 if qtype == gguf.GGMLQuantizationType.F16 else 4
    return shape, int(np.prod(shape)) * itemsize


def write_gguf(weights: Path, config: dict, log: Log, as_llama: bool = False) -> tuple[Path, dict]:
    """Write (once) the Q8_0 GGUF of ``weights``; as a Llama of the same size when ``as_llama`` or when the
    architecture is not one written natively. Returns (path, what writing it cost)."""
    import gguf

    d = Dims.of(config)
    as_llama = as_llama or d.arch not in NATIVE
    out = gguf_path(weights, as_llama)
    done = out.with_suffix(".json")
    if out.is_file() and done.is_file():
        log(f"GGUF Q8_0: cached {out.name}")
        return out, {**json.loads(done.read_text()), "cached": True}
    t0 = time.perf_counter()
    arch = "llama" if as_llama else d.arch
    tensors = (_llama_tensors(d) if as_llama else _native_tensors(weights, d)) + _rope_tensors(config, d, as_llama)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    # general.name must not name the model family: llama.cpp keys per-model token fix-ups on it (a name with "phi3"
    # looks up Phi-3's own special tokens, which this vocabulary does not have)
    w.add_name("fmchat bench shape random weights")
    w.add_file_type(MOSTLY_Q8_0)
    w.add_context_length(d.ctx)
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(d.ffn)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    w.add_layer_norm_rms_eps(d.eps)
    w.add_rope_freq_base(d.theta)
    w.add_vocab_size(d.vocab)
    c = dict(config.get("text_config") or {}) or config
    rotary = int(d.head_dim * float(c.get("partial_rotary_factor", 1.0) or 1.0))
    w.add_rope_dimension_count(rotary)
    if d.head_dim != d.hidden // d.heads:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    r = rope_params(c)
    if arch == "phi3" and c.get("original_max_position_embeddings"):
        orig = int(c["original_max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(orig)
        scale = d.ctx / orig
        if scale > 1 and r.get("rope_type") in ("longrope", "su"):
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
    tokens, scores, types = _vocab(d.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    plan = []
    for name, shape, load in tensors:
        qtype = _kind(name, shape)
        byte_shape, nbytes = _nbytes(shape, qtype)
        np_dtype = {gguf.GGMLQuantizationType.Q8_0: np.uint8, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.float32)
        w.add_tensor_info(name, byte_shape, np.dtype(np_dtype), nbytes,
                          raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)  # fmt: skip
        plan.append((name, qtype, load))
    total = sum(ti.nbytes for t in w.tensors for ti in t.values())
    log(f"GGUF Q8_0: writing {len(plan)} tensors ({total / 2**30:.2f} GiB, arch {arch}) to {out.name}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    written, next_report = 0, total / 10
    for i, (name, qtype, load) in enumerate(plan, 1):
        data = _encode(load(), qtype)
        w.write_tensor_data(data)
        written += data.nbytes
        del data
        if written >= next_report or i == len(plan):  # about every tenth of the bytes
            next_report = written + total / 10
            log(f"GGUF Q8_0: quantized and wrote {i}/{len(plan)} tensors ({written / 2**30:.2f} GiB, "
                f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    w.close()
    tmp.rename(out)
    info = {"seconds": round(time.perf_counter() - t0, 1), "bytes": out.stat().st_size, "arch": arch, "as_llama": as_llama,
            "tensors": len(plan), "q8_0_tensors": sum(q == gguf.GGMLQuantizationType.Q8_0 for _, q, _ in plan)}  # fmt: skip
    done.write_text(json.dumps(info))
    log(f"GGUF Q8_0: {info['bytes'] / 2**30:.2f} GiB written in {info['seconds']:.1f} s")
    return out, {**info, "cached": False}


def iter_names(path: Path) -> Iterator[str]:
    """The tensor names of a GGUF file (for tests and checks)."""
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        yield t.name

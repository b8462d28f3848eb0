"""Quantized weights kept across launches: ``--quant int8``/``int4``/``log8`` quantize once per model, not per launch.

Quantizing is most of an integer-scheme load: every weight is read, upcast to float32 and coded. Measured on the
2-core machine (docs/loading.md): the int8 load of SmolLM2-135M takes 2.5 s against 1.6 s mapped at bf16, and the
3.8B Phi-3.5 shape 33.7 s against llama.cpp's 2.8 s. The codes depend only on the checkpoint, the scheme, the dtype
of the unquantized rest and fmchat's quantizer code, so the first load saves the quantized model's tensors and every
later load maps that file copy-on-write (its pages are the tensors, as for a bf16 checkpoint: no copy, no peak).

An entry is ``<cache dir>/quantized/<key digest>/`` with ``weights.safetensors`` (a plain safetensors file: any
safetensors reader opens it) and ``meta.json`` (the key in clear, the file's size), written last: an entry without
it does not count. The key holds the weights' folder and files (name, size, mtime, and the config), the scheme, the
dtype, the device, this format, a hash of the quantizer's code (``QUANTIZER_FILES``) and the torch version (int4's
CPU layout is torch's), for int4 also the rows per block of torch's packing (64 with AVX-512, 32 with AVX2).

Loading rebuilds the quantized model's structure with ``quantize_model`` itself, on the meta device (which layers
are quantized, the tied head, the embedding store: the same code as a fresh quantization, so the two cannot drift),
then puts the file's tensors in place and the layers' settings (compute dtype, int4's layout) from the file's
metadata. Anything that does not fit (a missing or extra tensor, another shape, an unreadable file, another key)
discards the entry and the load quantizes afresh: a stale or corrupt entry is rebuilt, never a crash. The file's
bytes are not checksummed at load (hashing gigabytes would cost what mapping saves); it is written to a temporary
name and renamed, so a crash mid-write leaves no entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fmchat import paths

from ..base import ProgressFn
from . import compile_cache
from .checkpoint import _DTYPES, Checkpoint, put, tensor_holders

FORMAT = 1  # bump when the file's layout or metadata changes
FILE = "weights.safetensors"
# Every tensor starts at a multiple of 64 bytes in the file (so in memory: the mapping starts on a page): torch's
# ``_weight_int8pack_mm`` crashes (SIGSEGV, torch 2.13, AVX-512) on a 49152x64 int8 weight at an offset of 8 bytes.
ALIGN = 64
PAD = "__fmchat_padding_"
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_PLAIN = (bool, int, float, str, type(None), torch.dtype)


# The files of ``fmchat_kernels.quant`` that decide the codes and the modules holding them (not the kernels that
# multiply by them, nor their selection: a change there must not cost a 3.8B model its kept codes).
QUANTIZER_FILES = ("common.py", "embedding.py", "int4.py", "int8.py", "log8.py", "model.py")


@functools.cache
def _quantizer_hash() -> str:
    """The quantizer's code (``QUANTIZER_FILES``): a change there may change the codes."""
    import fmchat_kernels.quant as q

    h = hashlib.sha256()
    for name in QUANTIZER_FILES:
        with contextlib.suppress(OSError):
            h.update(name.encode() + (Path(q.__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def entry(weights: Path, quant: str, dtype: torch.dtype, device: str) -> compile_cache.Entry | None:
    """The store entry of ``weights`` quantized with ``quant`` (the rest at ``dtype``); None where none is kept (a
    GPU load: the file is mapped into CPU memory). ``$FMCHAT_QUANT_STORE=0`` keeps none."""
    if device != "cpu" or os.environ.get("FMCHAT_QUANT_STORE", "1") == "0":
        return None
    key = {
        "format": FORMAT,
        # the folder too: the fingerprint is the files' names, sizes and times, which a copy made with its times kept
        # shares with another model's (a wrong entry here would load silently: nothing checks codes against weights)
        "model": {"dir": str(Path(weights).resolve()), **compile_cache.weights_fingerprint(Path(weights))},
        "quant": quant,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "code": _quantizer_hash(),
        "torch": torch.__version__,
    }
    if quant == "int4":  # torch packs int4 for the running ISA's kernel: the codes hold its block size
        from fmchat_kernels.quant.gemv import int4_cpu_block

        key["int4_cpu_block"] = int4_cpu_block()
    return compile_cache.Entry(key, base=paths.quantized_dir(), artifact=FILE)


def _tensors(model: nn.Module, persistent_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` once (tied ones under their first name); ``persistent_only``: without
    the buffers the modules compute themselves (RoPE's ``inv_freq``, ...)."""
    skip = set()
    if persistent_only:
        for name, mod in model.named_modules():
            skip.update(f"{name}.{b}" if name else b for b in mod._non_persistent_buffers_set)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen and name not in skip:
            seen.add(id(t))
            out[name] = t
    return out


def _settings(model: nn.Module) -> dict[str, dict]:
    """The plain attributes of each quantized module (compute dtype, int4's layout, sizes, an embedding's scale)."""
    from fmchat_kernels.quant import QuantizedLinear
    from fmchat_kernels.quant.embedding import QuantizedEmbedding

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantizedLinear, QuantizedEmbedding)):
            out[name] = {k: (f"dtype:{v}" if isinstance(v, torch.dtype) else v) for k, v in vars(mod).items()
                         if not k.startswith("_") and isinstance(v, _PLAIN)}  # fmt: skip
    return out


def _restore_settings(model: nn.Module, settings: dict) -> None:
    for name, attrs in settings.items():
        mod = model.get_submodule(name)
        for k, v in attrs.items():
            if isinstance(v, str) and v.startswith("dtype:torch."):
                v = getattr(torch, v.removeprefix("dtype:torch."))
                if not isinstance(v, torch.dtype):
                    raise ValueError(f"{name}.{k}: not a dtype")
            setattr(mod, k, v)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def save(model: nn.Module, store: compile_cache.Entry, progress: ProgressFn) -> bool:
    """Write the quantized ``model``'s tensors to ``store`` (tensor by tensor from the model's own memory: no copy of
    the model is made). False, with the reason in ``progress``, when it could not be written (the load goes on)."""
    tensors = list(_tensors(model, persistent_only=True).items())
    header: dict[str, dict] = {}
    chunks: list[torch.Tensor] = []
    at = 0
    for name, t in tensors:
        if at % ALIGN:  # safetensors allows no gaps between tensors: a padding tensor fills it
            pad = ALIGN - at % ALIGN
            header[f"{PAD}{len(chunks)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [at, at + pad]}
            chunks.append(torch.zeros(pad, dtype=torch.uint8))
            at += pad
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        chunks.append(t)
        at += n
    header["__metadata__"] = {"fmchat": json.dumps({"key": store.key, "modules": _settings(model)}, default=str)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)  # the data starts aligned in the file
    scheme = getattr(model, "_quant_scheme", "?")
    tmp = None
    try:
        store.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            store.meta_path.unlink()
        fd, tmp = tempfile.mkstemp(dir=str(store.dir), prefix=FILE + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for i, t in enumerate(chunks, 1):
                f.write(_raw(t))
                progress(
                    f"keeping the {scheme} weights for the next launch: {i}/{len(chunks)} tensors", i / len(chunks)
                )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, store.artifacts)
        tmp = None
        meta = {"key": store.key, "bytes": store.artifacts.stat().st_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        compile_cache._atomic_write(store.meta_path, json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
        store.prune_superseded()
        return True
    except OSError as exc:
        progress(f"the {scheme} weights were not kept for the next launch ({exc.strerror or exc})", None)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        store.discard()
        return False


@contextlib.contextmanager
def _discarding(store: compile_cache.Entry) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
        store.discard()
        raise _Stale from None


class _Stale(Exception):
    pass


def load(model: nn.Module, store: compile_cache.Entry, quant: str, dtype: torch.dtype, progress: ProgressFn):
    """Quantize the skeleton ``model`` (parameters on the meta device) from ``store``: its ``QuantReport``, or None
    (the entry discarded) when the entry is missing or does not fit; ``model`` must then be rebuilt (its structure may
    have been changed already)."""
    from fmchat_kernels.quant import quantize_model
    from fmchat_kernels.quant.model import model_bytes

    if not store.exists():
        return None
    try:
        with _discarding(store):
            meta = store.meta()
            want = json.loads(json.dumps(store.key, sort_keys=True, default=str))
            path = store.artifacts
            if meta is None or meta.get("key") != want or meta.get("bytes") != path.stat().st_size:
                raise ValueError("meta.json does not match")
            ckpt = Checkpoint([path])
            info = json.loads(ckpt.metadata.get("fmchat", "{}"))
            if info.get("key") != want:
                raise ValueError("the file's key does not match")
            shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
            # the structure a fresh quantization makes (meta tensors: nothing is computed)
            report = quantize_model(model, quant, rest_dtype=dtype, device="meta",
                                    fetch=lambda name: torch.empty(shapes[name], device="meta"))  # fmt: skip
            _restore_settings(model, info.get("modules", {}))
            holders = tensor_holders(model, buffers=True)
            wanted = {name: t for name, t in _tensors(model).items() if t.device.type == "meta"}
            missing = [n for n in wanted if n not in ckpt.entries]
            if missing:
                raise ValueError(f"the file has no tensor '{missing[0]}'")
            for i, (name, t) in enumerate(wanted.items(), 1):
                e = ckpt.entries[name]
                if e.dtype is None or e.shape != tuple(t.shape) or e.start % ALIGN:
                    raise ValueError(f"'{name}' does not fit the model")
                put(holders[id(t)], ckpt.mapped(name))
                progress(
                    f"mapping the {quant} weights kept at the first load: {i}/{len(wanted)} tensors", i / len(wanted)
                )
            report.bytes_after = model_bytes(model)
            return report
    except _Stale:
        progress(f"the kept {quant} weights did not fit this model: quantizing afresh", None)
        return None

"""A whole model: ``quantize_model`` and what it reports, plus the model-level queries."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .common import QuantizedLinear, _storage_bytes
from .embedding import QuantizedEmbedding
from .int4 import INT4_GROUP, Int4Linear
from .int8 import Int8Linear
from .log8 import Log8Linear

SCHEMES = ("none", "bf16", "fp16", "int8", "int4", "log8")
CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AlreadyQuantized(ValueError):
    """quantize_model was given a model that already holds quantized layers: re-quantize from the originals."""


LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "log8": Log8Linear}
EMBED_SCHEME = {"int8": "int8", "int4": "int8", "log8": "log8"}  # int4's packed CPU layout has no row access


@dataclass
class QuantReport:
    scheme: str
    quantized: list[str] = field(default_factory=list)  # module names replaced by quantized layers
    skipped: list[str] = field(default_factory=list)  # linear layers left as they were (and why)
    bytes_before: int = 0
    bytes_after: int = 0


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer storage the model holds (shared storages counted once)."""
    return _storage_bytes(list(model.parameters()) + list(model.buffers()))


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "_quant_scheme", "none") != "none" or any(
        isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules()
    )


def default_compute_dtype(scheme: str, device: torch.device) -> torch.dtype:
    """int8/int4 CPU kernels are fast with bf16 activations (fp32 ones take a slow path); log8 decodes to fp32."""
    if device.type == "cpu":
        return torch.float32 if scheme == "log8" else torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def quantize_model(
    model: nn.Module,
    scheme: str,
    *,
    skip: tuple[str, ...] = ("lm_head",),
    embeddings: bool = True,
    compute_dtype: torch.dtype | None = None,
    group_size: int = INT4_GROUP,
    rest_dtype: torch.dtype | None = None,
    progress: Callable[[str, float | None], None] | None = None,
) -> QuantReport:
    """Quantize ``model`` in place with ``scheme`` and return what was done.

    Raises AlreadyQuantized when the model was quantized (or cast by ``bf16``/``fp16``) by an earlier call:
    switching schemes means reloading the original weights, never quantizing a quantized model twice.
    ``embeddings``: also quantize the input embedding table (int8 for int8 and int4, log8 for log8); when
    the output head is tied to it, the head becomes that same store (one table, used both ways).
    ``rest_dtype``: for int8/int4/log8, cast the parameters left unquantized (embeddings, norms, output
    head) to this dtype afterwards; quantized layers keep their own store.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme}' (use {', '.join(SCHEMES)})")
    if is_quantized(model):
        raise AlreadyQuantized(
            f"model is already quantized ({getattr(model, '_quant_scheme', '?')}); reload the original weights to switch"
        )
    report = QuantReport(scheme, bytes_before=model_bytes(model))
    if scheme == "none":
        report.bytes_after = report.bytes_before
        return report
    if scheme in CAST_DTYPES:
        model.to(CAST_DTYPES[scheme])
        model._quant_scheme = scheme
        report.bytes_after = model_bytes(model)
        return report
    cls = LINEAR_CLASSES[scheme]
    tied_head = None
    if embeddings and hasattr(model, "get_input_embeddings"):
        tied_head = _quantize_embeddings(model, scheme, rest_dtype, report)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for i, (name, lin) in enumerate(targets):
        if isinstance(lin, QuantizedLinear) or lin is tied_head:
            continue
        if name.split(".")[-1] in skip or name in skip:
            report.skipped.append(f"{name} (output head kept)")
            continue
        if scheme == "int4" and lin.in_features % group_size:
            report.skipped.append(f"{name} (in_features {lin.in_features} not a multiple of {group_size})")
            continue
        cd = compute_dtype or default_compute_dtype(scheme, lin.weight.device)
        kw = {"group_size": group_size} if scheme == "int4" else {}
        with torch.no_grad():
            q = cls.from_weight(lin.weight, lin.bias, compute_dtype=cd, **kw)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)  # the nn.Linear (and its weight, unless shared elsewhere) is now unreferenced
        report.quantized.append(name)
        del lin, q
        if progress and (i % 8 == 0 or i == len(targets) - 1):
            progress(f"quantizing to {scheme}: {i + 1}/{len(targets)} linear layers", (i + 1) / len(targets))
    del targets
    if rest_dtype is not None:
        for mod in model.modules():
            if isinstance(mod, QuantizedLinear):
                continue
            for p in mod.parameters(recurse=False):  # tied parameters are one object: cast once, tie kept
                if p.is_floating_point() and p.dtype != rest_dtype:
                    p.data = p.data.to(rest_dtype)
    gc.collect()
    _release_freed_memory()
    model._quant_scheme = scheme
    report.bytes_after = model_bytes(model)
    return report


def _quantize_embeddings(model, scheme, rest_dtype, report) -> nn.Module | None:
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    es = EMBED_SCHEME[scheme]
    cls = LINEAR_CLASSES[es]
    out_dtype = rest_dtype or emb.weight.dtype
    compute = default_compute_dtype(es, emb.weight.device)
    with torch.no_grad():
        store = cls.from_weight(emb.weight, None, compute_dtype=compute)
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names[id(emb)]
    parent, _, child = emb_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, QuantizedEmbedding(store, out_dtype, emb.padding_idx))
    report.quantized.append(f"{emb_name} ({es})")
    if tied:
        head_name = names[id(head)]
        parent, _, child = head_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, store)
        report.quantized.append(f"{head_name} ({es}, tied: the embedding's store)")
        return store
    return None


def _release_freed_memory() -> None:
    """Hand the freed full-precision weights back to the OS (glibc keeps freed heap pages otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

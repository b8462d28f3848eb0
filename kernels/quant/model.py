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
    fetch: Callable[[str], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> QuantReport:
    """Quantize ``model`` in place with ``scheme`` and return what was done.

    Raises AlreadyQuantized when the model was quantized (or cast by ``bf16``/``fp16``) by an earlier call:
    switching schemes means reloading the original weights, never quantizing a quantized model twice.
    ``embeddings``: also quantize the input embedding table (int8 for int8 and int4, log8 for log8); when
    the output head is tied to it, the head becomes that same store (one table, used both ways).
    ``rest_dtype``: for int8/int4/log8, cast the parameters left unquantized (embeddings, norms, output
    head) to this dtype afterwards; quantized layers keep their own store.

    ``fetch`` (int8/int4/log8 only): quantize while loading. The model is then a skeleton whose parameters are on the
    meta device (buffers real), and ``fetch(name)`` returns the checkpoint tensor of the parameter ``name`` (as
    ``model.named_parameters()`` names it; tied parameters once, under their first name), in any float dtype; it
    may be a view of a buffer that the next fetch overwrites (it is read, or copied, never kept). Each
    tensor is moved to ``device``, quantized (``from_weight`` upcasts one chunk of rows at a time to float32, so the
    codes are bit-identical to quantizing a float32 copy of the model) or converted to ``rest_dtype`` (default: the
    skeleton's dtype), and dropped before the next is fetched: the loading peak is the result plus about one tensor.
    ``progress`` then hears of every tensor.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme}' (use {', '.join(SCHEMES)})")
    if is_quantized(model):
        raise AlreadyQuantized(
            f"model is already quantized ({getattr(model, '_quant_scheme', '?')}); reload the original weights to switch"
        )
    if fetch is not None and scheme not in LINEAR_CLASSES:
        raise ValueError(f"quantizing while loading is for {', '.join(LINEAR_CLASSES)}; load '{scheme}' at its dtype")
    streaming = fetch is not None
    report = QuantReport(scheme, bytes_before=_skeleton_bytes(model) if streaming else model_bytes(model))
    if scheme == "none":
        report.bytes_after = report.bytes_before
        return report
    if scheme in CAST_DTYPES:
        model.to(CAST_DTYPES[scheme])
        model._quant_scheme = scheme
        report.bytes_after = model_bytes(model)
        return report
    cls = LINEAR_CLASSES[scheme]
    take = _Loader(model, scheme, fetch, device, progress) if streaming else None
    tied_head = None
    if embeddings and hasattr(model, "get_input_embeddings"):
        tied_head = _quantize_embeddings(model, scheme, rest_dtype, report, take)
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
        kw = {"group_size": group_size} if scheme == "int4" else {}
        with torch.no_grad():
            if take is None:
                cd = compute_dtype or default_compute_dtype(scheme, lin.weight.device)
                q = cls.from_weight(lin.weight, lin.bias, compute_dtype=cd, **kw)
            else:  # the bias as float32, as the in-place path (a float32 model) passes it; a copy, read first
                cd = compute_dtype or default_compute_dtype(scheme, torch.device(device))
                bias = None if lin.bias is None else take(lin.bias).to(torch.float32, copy=True)
                q = cls.from_weight(take(lin.weight), bias, compute_dtype=cd, **kw)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)  # the nn.Linear (and its weight, unless shared elsewhere) is now unreferenced
        report.quantized.append(name)
        del lin, q
        if progress and take is None and (i % 8 == 0 or i == len(targets) - 1):
            progress(f"quantizing to {scheme}: {i + 1}/{len(targets)} linear layers", (i + 1) / len(targets))
    del targets
    if take is not None:
        take.rest(rest_dtype)
    if rest_dtype is not None:
        for mod in model.modules():
            if isinstance(mod, QuantizedLinear):
                continue
            for p in mod.parameters(recurse=False):  # tied parameters are one object: cast once, tie kept
                if p.is_floating_point() and p.dtype != rest_dtype:
                    p.data = p.data.to(rest_dtype)
    gc.collect()
    release_freed_memory()
    model._quant_scheme = scheme
    report.bytes_after = model_bytes(model)
    return report


def _quantize_embeddings(model, scheme, rest_dtype, report, take=None) -> nn.Module | None:
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names[id(emb)]
    scale = embedding_scale(emb)
    if isinstance(scale, str):  # a forward of its own that we cannot reproduce: keep the table as it is
        report.skipped.append(f"{emb_name} ({scale})")
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    es = EMBED_SCHEME[scheme]
    cls = LINEAR_CLASSES[es]
    out_dtype = rest_dtype or emb.weight.dtype
    with torch.no_grad():
        if take is None:
            store = cls.from_weight(emb.weight, None, compute_dtype=default_compute_dtype(es, emb.weight.device))
        else:
            store = cls.from_weight(take(emb.weight), None, compute_dtype=default_compute_dtype(es, take.device))
    parent, _, child = emb_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, QuantizedEmbedding(store, out_dtype, emb.padding_idx, scale))
    report.quantized.append(f"{emb_name} ({es})")
    if tied:
        head_name = names[id(head)]
        parent, _, child = head_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, store)
        report.quantized.append(f"{head_name} ({es}, tied: the embedding's store)")
        return store
    return None


def embedding_scale(emb: nn.Embedding) -> float | None | str:
    """The factor an embedding multiplies its rows by: None for a plain ``nn.Embedding``; the scale of a scaled one
    (Gemma's ``*TextScaledWordEmbedding`` keeps it as ``scalar_embed_scale`` and as the buffer ``embed_scale``,
    Bart's and its kin as the float ``embed_scale``); for any other subclass with a forward of its own, why it
    cannot be replaced (its table is then left as it is)."""
    if type(emb).forward is nn.Embedding.forward:
        return None
    for attr in ("scalar_embed_scale", "embed_scale"):
        value = getattr(emb, attr, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return f"{type(emb).__name__} has a forward of its own: input embedding kept"


class _Loader:
    """Streaming: the checkpoint tensor of each meta parameter, fetched once, on the device, with progress."""

    def __init__(self, model: nn.Module, scheme: str, fetch: Callable[[str], torch.Tensor], device, progress):
        self.model, self.scheme, self.fetch, self.progress = model, scheme, fetch, progress
        self.device = torch.device(device)
        self.names = {id(p): name for name, p in model.named_parameters()}  # tied parameters once, first name
        self.done = 0

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        if param.device.type != "meta":
            raise ValueError("quantizing while loading needs a model whose parameters are on the meta device")
        name = self.names[id(param)]
        t = self.fetch(name)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{name}: the checkpoint has shape {tuple(t.shape)}, the model {tuple(param.shape)}")
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            t = t.float()  # e.g. float64: round once, to float32, as loading a float32 model does
        self.done += 1
        if self.progress:
            n = len(self.names)
            self.progress(f"loading and quantizing weights ({self.scheme}): {self.done}/{n} tensors", self.done / n)
        return t.to(self.device)

    def rest(self, dtype: torch.dtype | None) -> None:
        """Load every parameter still on the meta device (norms, the output head, ...) at ``dtype`` (default: the
        skeleton's), each tied parameter once, set on every module that holds it."""
        holders: dict[int, list] = {}
        for mod in self.model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and p.device.type == "meta":
                    holders.setdefault(id(p), []).append((mod, attr, p))
        for group in holders.values():
            p = group[0][2]
            t = self(p)
            t = t.to(dtype or p.dtype if t.is_floating_point() else p.dtype, copy=True)  # fetch's tensor is not kept
            new = nn.Parameter(t, requires_grad=p.requires_grad and t.is_floating_point())
            for mod, attr, _ in group:
                mod._parameters[attr] = new
            del t, new


def _skeleton_bytes(model: nn.Module) -> int:
    """What ``model_bytes`` would count once the skeleton's meta parameters were loaded at their dtype."""
    params = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(params.values()) + _storage_bytes(b for b in model.buffers() if b.device.type != "meta")


def release_freed_memory() -> None:
    """Hand the freed full-precision weights back to the OS (glibc keeps freed heap pages otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

"""Weight-only quantization of a model's linear layers: int8, int4, log8, and bf16/fp16 casts.

``quantize_model(model, scheme)`` replaces every ``nn.Linear`` (except the output head, and for int4
any layer whose input width is not a multiple of the group size) with a module that stores only the
low-bit form as buffers; the original weight tensor is dropped, layer by layer, as it goes.

Schemes and their stores (N outputs, K inputs):

* ``int8``: ``weight_int8`` int8 [N, K] + ``scales`` fp32 [N] (per output channel, symmetric,
  scale = max|w| / 127). Matmul: ``torch._weight_int8pack_mm`` (CPU, and CUDA where the build has it),
  else ``x @ (q * s)``-style dequantize-in-the-matmul fallback.
* ``int4``: asymmetric groups of ``group_size`` (32) along K, 4-bit codes two per byte + bf16
  scale and zero per group ([K/g, N, 2]), so 0.5 + 4/g bytes per weight. Dequantized value is
  ``(q - 8) * scale + zero`` (the tinygemm convention). On CPU the codes are stored in the layout of
  ``torch._convert_weight_to_int4pack_for_cpu`` and the matmul is ``torch._weight_int4pack_mm_for_cpu``;
  elsewhere they are plain nibbles (low nibble = even column) decoded in the matmul path.
* ``log8``: one signed byte per weight, ``c = sign(w) * m`` with ``m`` in 0..127; ``m = 0`` is zero and
  ``m >= 1`` is ``2 ** (lo + (m - 1) * step)``, with ``lo`` and ``step`` per output channel (its log
  range: the top is max|w|, the bottom is searched per channel to minimise the squared error).
  Decoded on the fly in the matmul (chunked over rows); no decoded copy is kept.
* ``bf16`` / ``fp16``: the whole model cast; ``none``: unchanged.

This package never imports ``fmchat``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("none", "bf16", "fp16", "int8", "int4", "log8")
CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INT4_GROUP = 32
LOG8_RANGES = (4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0)  # candidate log2 ranges (octaves) per channel
LOG8_SEARCH_COLS = 128  # columns per row on which the log range is chosen
LOG8_CHUNK_ELEMS = 1 << 21  # rows decoded at a time in the log8 matmul: at most this many weights


class AlreadyQuantized(ValueError):
    """quantize_model was given a model that already holds quantized layers: re-quantize from the originals."""


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


HAS_INT8_MM = _has_op("_weight_int8pack_mm")
HAS_INT4_CPU = _has_op("_convert_weight_to_int4pack_for_cpu") and _has_op("_weight_int4pack_mm_for_cpu")


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


class QuantizedLinear(nn.Module):
    """Common part: shapes, bias, the compute dtype, and the reshaping around the 2-D matmul."""

    scheme = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        if bias is not None:
            self.register_buffer("bias", bias.detach().to(compute_dtype).clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = self._mm(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight this layer really multiplies by, as fp32 [N, K] (for tests and error reports)."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of the weight store (codes + scales), bias excluded."""
        return _storage_bytes(t for n, t in self.named_buffers() if n != "bias")

    def extra_repr(self) -> str:
        return f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}"


# Under torch.compile the packed matmuls are opaque custom ops: inductor's own lowering of
# _weight_int8pack_mm / _weight_int4pack_mm_for_cpu asserts on a computed (cast) input, and gains nothing here.
@torch.library.custom_op("kernels_quant::int8pack_mm", mutates_args=())
def _int8pack_mm_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.contiguous(), w, s)


@_int8pack_mm_op.register_fake
def _(x, w, s):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("kernels_quant::int4pack_mm_cpu", mutates_args=())
def _int4pack_mm_op(x: torch.Tensor, w: torch.Tensor, group_size: int, sz: torch.Tensor, n: int) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), w, group_size, sz)


@_int4pack_mm_op.register_fake
def _(x, w, group_size, sz, n):
    return x.new_empty(x.shape[0], n)


# ---------------------------------------------------------------------- one-row GEMVs (compiled decode step)
def float_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[1, K]`` times a bf16/fp16 ``w`` ``[N, K]`` (+ ``bias``), for tracing under ``torch.compile``: one
    fused loop that reads each weight once and accumulates in fp32. On the 2-core CPU of docs/decode.md it streams
    a whole model's bf16 weights at ~29 GB/s, against ~11 GB/s for the prepacked oneDNN linear at one row."""
    y = (x.float() * w.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(1, -1)


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, K]`` times int8 ``w`` ``[N, K]`` with per-row ``scales``, for tracing under ``torch.compile``.

    Written as a broadcast product and a sum so that inductor emits one loop nest that reads each int8 weight
    once, converts it in registers and accumulates in fp32 (no dequantized copy). For one row this streams the
    weights from memory ~1.9x faster than ``_weight_int8pack_mm`` on the 2-core CPU of docs/decode.md.
    """
    return ((x.float() * w.float()).sum(-1) * scales.float()).to(x.dtype).reshape(1, -1)


# ---------------------------------------------------------------------------------------------- int8
class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, compute_dtype=torch.bfloat16) -> Int8Linear:
        n, k = weight.shape
        m = cls(k, n, bias, compute_dtype, device=weight.device)
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        m.weight_int8.copy_(torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8))
        m.scales.copy_(scales)
        return m

    def _mm(self, x2):
        s = self.scales.to(x2.dtype)
        if HAS_INT8_MM and (x2.device.type == "cpu" or self._cuda_op_ok(x2)):
            if torch.compiler.is_compiling():
                if x2.shape[0] == 1:  # one row (a decode step): a fused GEMV, see int8_gemv
                    return int8_gemv(x2, self.weight_int8, self.scales)
                return torch.ops.kernels_quant.int8pack_mm(x2, self.weight_int8, s)  # s: folded once under freezing
            return torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, s)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * s  # dequantize in the matmul path

    _cuda_op: bool | None = None

    def _cuda_op_ok(self, x2) -> bool:
        if Int8Linear._cuda_op is None:  # probe once whether this build has the CUDA kernel
            try:
                torch._weight_int8pack_mm(x2[:1].contiguous(), self.weight_int8, self.scales.to(x2.dtype))
                Int8Linear._cuda_op = True
            except (RuntimeError, NotImplementedError):
                Int8Linear._cuda_op = False
        return Int8Linear._cuda_op

    def dequantize(self):
        return self.weight_int8.float() * self.scales[:, None]

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        return (self.weight_int8[ids].float() * self.scales[ids][..., None]).to(dtype)


# ---------------------------------------------------------------------------------------------- int4
class Int4Linear(QuantizedLinear):
    scheme = "int4"

    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.bfloat16, group_size=INT4_GROUP,
                 layout: str = "nibble", device=None):  # fmt: skip
        super().__init__(in_features, out_features, bias, compute_dtype)
        if in_features % group_size or in_features % 2:
            raise ValueError(f"int4: in_features {in_features} is not a multiple of the group size {group_size}")
        self.group_size = group_size
        self.layout = layout  # "cpu" (the _for_cpu tinygemm layout) or "nibble"
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16, device=device)
        )

    @classmethod
    def from_weight(cls, weight, bias=None, compute_dtype=torch.bfloat16, group_size=INT4_GROUP) -> Int4Linear:
        n, k = weight.shape
        layout = "cpu" if (weight.device.type == "cpu" and HAS_INT4_CPU) else "nibble"
        m = cls(k, n, bias, compute_dtype, group_size, layout, device=weight.device)
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16).float()
        zero = (lo + 8.0 * scale).to(torch.bfloat16).float()  # value of code 8
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).to(torch.int32).reshape(n, k)
        if layout == "cpu":
            m.weight_int4.copy_(torch._convert_weight_to_int4pack_for_cpu(q, 1))
        else:
            m.weight_int4.copy_((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        m.scales_zeros.copy_(torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16))
        return m

    def _unpack(self) -> torch.Tensor:  # nibble layout -> int codes [N, K]
        p = self.weight_int4
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def _dequant(self, dtype) -> torch.Tensor:
        g = self.group_size
        sz = self.scales_zeros.to(dtype)
        scale = sz[..., 0].t().repeat_interleave(g, dim=1)
        zero = sz[..., 1].t().repeat_interleave(g, dim=1)
        return (self._unpack().to(dtype) - 8) * scale + zero

    def _mm(self, x2):
        if self.layout == "cpu":
            if torch.compiler.is_compiling():
                return torch.ops.kernels_quant.int4pack_mm_cpu(x2, self.weight_int4, self.group_size,
                                                              self.scales_zeros.to(x2.dtype), self.out_features)  # fmt: skip
            return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_int4, self.group_size,
                                                     self.scales_zeros.to(x2.dtype))  # fmt: skip
        return F.linear(x2, self._dequant(x2.dtype))

    def dequantize(self):
        if self.layout == "cpu":  # the packed layout is the kernel's own: read it back through the kernel
            eye = torch.eye(self.in_features, dtype=torch.float32)
            return torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, self.scales_zeros.float()).t()
        return self._dequant(torch.float32)


# ---------------------------------------------------------------------------------------------- log8
def _log8_encode(w: torch.Tensor, octaves: torch.Tensor):
    """Codes for rows of ``w`` given each row's log range ``octaves`` [N]: returns (codes int8, lo, step)."""
    a = w.abs()
    hi = torch.log2(a.amax(dim=1).clamp_min(1e-30))
    lo = hi - octaves
    step = octaves / 126.0
    la = torch.log2(a.clamp_min(1e-38))
    pos = ((la - lo[:, None]) / step[:, None]).clamp_(min=-1.0, max=126.0)  # (m - 1) as a real number
    f = torch.floor(pos)
    v_lo = torch.where(f < 0, torch.zeros_like(a), torch.exp2(lo[:, None] + f * step[:, None]))
    v_hi = torch.exp2(lo[:, None] + torch.clamp(f + 1, max=126.0) * step[:, None])
    m = torch.where(a - v_lo > v_hi - a, f + 1, f).clamp_(-1, 126) + 1  # nearest in the linear domain
    codes = (torch.sign(w) * m).to(torch.int8)
    return codes, lo, step


def _log8_decode(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    c = codes.to(torch.float32)
    v = torch.exp2(torch.addcmul((lo - step)[..., None], c.abs(), step[..., None]))
    return (v * torch.sign(c)).to(dtype)  # sign(0) = 0: code 0 is an exact zero


class Log8Linear(QuantizedLinear):
    scheme = "log8"

    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("log_lo", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("log_step", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight, bias=None, compute_dtype=torch.float32) -> Log8Linear:
        n, k = weight.shape
        m = cls(k, n, bias, compute_dtype, device=weight.device)
        w = weight.detach().float()
        # Per channel, pick the log range with the least squared error, judged on a column sample (plus
        # each row's largest weight, which fixes the top of the range), then encode the full rows once.
        cols = torch.arange(0, k, max(1, k // LOG8_SEARCH_COLS), device=w.device)
        sample = torch.cat([w[:, cols], w.gather(1, w.abs().argmax(dim=1, keepdim=True))], dim=1)
        best_err = torch.full((n,), float("inf"), device=w.device)
        best = torch.full((n,), LOG8_RANGES[0], device=w.device)
        for r in LOG8_RANGES:
            octaves = torch.full((n,), r, device=w.device)
            err = (_log8_decode(*_log8_encode(sample, octaves)) - sample).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, octaves, best)
        codes, lo, step = _log8_encode(w, best)
        m.codes.copy_(codes)
        m.log_lo.copy_(lo)
        m.log_step.copy_(step)
        return m

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        return _log8_decode(self.codes[ids], self.log_lo[ids], self.log_step[ids], dtype)

    def _mm(self, x2):
        rows = max(1, LOG8_CHUNK_ELEMS // self.in_features)
        if rows >= self.out_features:
            return F.linear(x2, _log8_decode(self.codes, self.log_lo, self.log_step, x2.dtype))
        out = []
        for i in range(0, self.out_features, rows):
            sl = slice(i, i + rows)
            out.append(F.linear(x2, _log8_decode(self.codes[sl], self.log_lo[sl], self.log_step[sl], x2.dtype)))
        return torch.cat(out, dim=-1)

    def dequantize(self):
        return _log8_decode(self.codes, self.log_lo, self.log_step)


LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "log8": Log8Linear}
EMBED_SCHEME = {"int8": "int8", "int4": "int8", "log8": "log8"}  # int4's packed CPU layout has no row access


class QuantizedEmbedding(nn.Module):
    """An input embedding whose table is a row-addressable quantized store (Int8Linear or Log8Linear).

    With tied embeddings the same store is also the output head, so the table is held once."""

    def __init__(self, store: Int8Linear | Log8Linear, out_dtype: torch.dtype, padding_idx=None):
        super().__init__()
        self.store = store
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = store.out_features, store.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.store.rows(ids, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.store.scheme}, {self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------------------------------------- model
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


def bytes_per_weight(layer: QuantizedLinear) -> float:
    return layer.stored_bytes() / (layer.in_features * layer.out_features)


def relative_error(layer: QuantizedLinear, weight: torch.Tensor) -> float:
    """||W_q - W|| / ||W|| in the Frobenius norm."""
    w = weight.detach().float()
    return float(torch.linalg.norm(layer.dequantize().to(w.device) - w) / torch.linalg.norm(w).clamp_min(1e-30))


__all__ = [
    "SCHEMES", "AlreadyQuantized", "Int4Linear", "Int8Linear", "Log8Linear", "QuantReport", "QuantizedEmbedding",
    "QuantizedLinear",
    "bytes_per_weight", "is_quantized", "model_bytes", "quantize_model", "relative_error",
]  # fmt: skip

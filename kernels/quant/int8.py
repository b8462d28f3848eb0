"""``int8``: per-output-channel symmetric int8 codes and fp32 scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import (
    choices,
    native,
    ops,  # noqa: F401  (registers torch.ops.kernels_quant.*)
)
from .common import HAS_INT8_MM, QuantizedLinear, row_chunks
from .gemv import int8_gemv, mm_weight_chunks


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
        if weight.device.type == "meta":  # the layer's structure only (shapes, dtypes), no values to compute
            return m
        with torch.no_grad():
            for rows in row_chunks(n, k):  # float32 copies of one chunk at a time (any input dtype)
                w = weight[rows].detach().float()
                scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
                m.weight_int8[rows] = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
                m.scales[rows] = scales
        return m

    def _mm(self, x2):
        s = self.scales.to(x2.dtype)
        if HAS_INT8_MM and (x2.device.type == "cpu" or self._cuda_op_ok(x2)):
            if torch.compiler.is_dynamo_compiling():  # traced (is_compiling() holds in all threads while one compiles)
                # one row (a decode step): the kernel measured fastest on this machine (select.py)
                shape = (self.out_features, self.in_features)
                kernel = choices.one_row("int8", compiled=True, shape=shape) if x2.shape[0] == 1 else None
                if kernel == "fused":
                    return int8_gemv(x2, self.weight_int8, self.scales)
                if kernel in choices.NATIVE and x2.device.type == "cpu":
                    return native.one_row(kernel, x2, self.weight_int8, self.scales)
                return torch.ops.kernels_quant.int8pack_mm(x2, self.weight_int8, s)  # s: folded once under freezing
            if x2.device.type == "cpu" and x2.shape[0] == 1:
                kernel = choices.one_row("int8", compiled=False)
                if kernel in choices.NATIVE:
                    return native.one_row(kernel, x2, self.weight_int8, self.scales)
            if x2.device.type == "cpu":
                plan = choices.prefill_plan("int8", x2.shape[0])
                if plan is not None:  # many rows: a float GEMM on the cast codes beats the packed kernel (measured)
                    return self.mm_float_chunks(x2, *plan)
            return torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, s)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * s  # dequantize in the matmul path

    def mm_float_chunks(self, x2: torch.Tensor, chunk_rows: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x2 @ W.T`` through the float GEMM of ``dtype`` (default ``x2``'s: bf16; fp32 where bf16 GEMMs are slow, e.g.
        without AVX-512 bf16): ``chunk_rows`` weight rows at a time (0: all) cast to ``dtype`` (the codes, |q| <= 127,
        are exact in bf16), the per-row scales applied to the product (as the packed kernel does); the result in
        ``x2``'s dtype. The temporary is one chunk of weights."""
        dtype = dtype or x2.dtype
        return mm_weight_chunks(x2, self.out_features, chunk_rows, dtype, lambda rows, xd: F.linear(
            xd, self.weight_int8[rows].to(dtype)) * self.scales[rows].to(dtype))

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

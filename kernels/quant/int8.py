"""``int8``: per-output-channel symmetric int8 codes and fp32 scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (registers torch.ops.kernels_quant.*)
from .common import HAS_INT8_MM, QuantizedLinear, row_chunks
from .gemv import int8_gemv


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

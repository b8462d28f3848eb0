"""``int4``: asymmetric groups along K, two 4-bit codes per byte plus a bf16 scale and zero per group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import (
    choices,
    ops,  # noqa: F401  (registers torch.ops.kernels_quant.*)
)
from .common import HAS_INT4_CPU, QuantizedLinear, row_chunks
from .gemv import int4_cpu_codes, int4_dequant, mm_weight_chunks

INT4_GROUP = 32


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
        if weight.device.type == "meta":  # the layer's structure only (shapes, dtypes), no values to compute
            return m
        with torch.no_grad():
            for rows in row_chunks(n, k):  # whole 64-row blocks: the CPU packing packs each block on its own
                r = rows.stop - rows.start
                w = weight[rows].detach().float().reshape(r, k // group_size, group_size)
                lo, hi = w.amin(dim=2), w.amax(dim=2)
                scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16).float()
                zero = (lo + 8.0 * scale).to(torch.bfloat16).float()  # value of code 8
                q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).to(torch.int32)
                q = q.reshape(r, k)
                if layout == "cpu":
                    m.weight_int4[rows] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
                else:
                    m.weight_int4[rows] = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
                m.scales_zeros[:, rows] = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16)
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
            if torch.compiler.is_dynamo_compiling():  # traced (is_compiling() holds in all threads while one compiles)
                return torch.ops.kernels_quant.int4pack_mm_cpu(x2, self.weight_int4, self.group_size,
                                                              self.scales_zeros.to(x2.dtype), self.out_features)  # fmt: skip
            plan = choices.prefill_plan("int4", x2.shape[0])
            if plan is not None:  # many rows: dequantize and use a float GEMM (measured faster)
                return self.mm_float_chunks(x2, *plan)
            return torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_int4, self.group_size,
                                                     self.scales_zeros.to(x2.dtype))  # fmt: skip
        return F.linear(x2, self._dequant(x2.dtype))

    def mm_float_chunks(self, x2: torch.Tensor, chunk_rows: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x2 @ W.T`` through the float GEMM of ``dtype`` (default ``x2``'s), ``chunk_rows`` weight rows (a multiple of
        64, the packed layout's blocks; 0: all) dequantized at a time; the result in ``x2``'s dtype. CPU layout only."""
        dtype, k = dtype or x2.dtype, self.in_features
        return mm_weight_chunks(x2, self.out_features, chunk_rows, dtype, lambda rows, xd: F.linear(xd, int4_dequant(
            int4_cpu_codes(self.weight_int4[rows], k), self.scales_zeros[:, rows], self.group_size, dtype)))

    def dequantize(self):
        if self.layout == "cpu":  # the packed layout is the kernel's own: read it back through the kernel
            eye = torch.eye(self.in_features, dtype=torch.float32)
            return torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, self.scales_zeros.float()).t()
        return self._dequant(torch.float32)

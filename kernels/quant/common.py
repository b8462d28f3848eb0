"""What every quantized layer shares: the ``QuantizedLinear`` base (shapes, bias, compute dtype, the reshaping
around the 2-D matmul), which packed ATen matmuls this torch build has, and per-layer measures (stored bytes, bytes
per weight, relative error)."""

from __future__ import annotations

import torch
from torch import nn


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


HAS_INT8_MM = _has_op("_weight_int8pack_mm")
HAS_INT4_CPU = _has_op("_convert_weight_to_int4pack_for_cpu") and _has_op("_weight_int4pack_mm_for_cpu")

# Weights quantized at a time by ``from_weight`` (at least 64 rows): its float32 temporaries (log8 keeps the most,
# ~20 MiB in all) are those of one chunk, not of the whole tensor, so quantizing a tensor as it is loaded costs little
# beyond its codes. (Measured on one thread, 4096x1024: 2**18 is also faster than 2**20 or 2**22 — the chunk stays in
# cache — log8 0.2 s vs 0.35/0.4 s, int8 0.02 vs 0.03/0.05 s.)
QUANT_CHUNK_ELEMS = 1 << 18


def row_chunks(n: int, k: int):
    """Slices of the ``n`` rows of an [n, k] weight, about ``QUANT_CHUNK_ELEMS`` weights each, in whole multiples of 64
    rows (the blocks of int4's CPU packing). Every scheme's codes and scales are per row (int4: per group within a
    row), so quantizing chunk by chunk gives the same bits as quantizing the whole tensor at once."""
    rows = max(64, QUANT_CHUNK_ELEMS // max(k, 1) // 64 * 64)
    for i in range(0, n, rows):
        yield slice(i, min(i + rows, n))


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


def bytes_per_weight(layer: QuantizedLinear) -> float:
    return layer.stored_bytes() / (layer.in_features * layer.out_features)


def relative_error(layer: QuantizedLinear, weight: torch.Tensor) -> float:
    """||W_q - W|| / ||W|| in the Frobenius norm."""
    w = weight.detach().float()
    return float(torch.linalg.norm(layer.dequantize().to(w.device) - w) / torch.linalg.norm(w).clamp_min(1e-30))

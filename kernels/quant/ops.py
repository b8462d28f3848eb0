"""The packed matmuls as torch custom ops (``torch.ops.kernels_quant.*``), registered once, when this module is
first imported (int8 and int4 import it)."""

from __future__ import annotations

import torch


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

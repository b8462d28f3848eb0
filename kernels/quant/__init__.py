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

Modules: ``common`` (the ``QuantizedLinear`` base, packed-op availability, per-layer measures), ``ops`` (the packed
matmuls as torch custom ops, registered on import), ``gemv`` (one-row GEMVs for the compiled decode step, int4's CPU
layout decoded), ``select`` (which kernel each product uses on this machine: measured once, cached in a JSON file the
caller names; ``select.ensure_for_model``, ``select.current_choices``) over ``choices`` (the chosen kernels the layers
read), one module per scheme (``int8``, ``int4``, ``log8``), ``embedding`` (``QuantizedEmbedding``) and ``model`` (``quantize_model``).

Installed as ``fmchat_kernels.quant`` (the folder is ``kernels/quant/``). This package never imports ``fmchat``.
"""

from . import native, select
from .common import QuantizedLinear, bytes_per_weight, relative_error
from .embedding import QuantizedEmbedding
from .gemv import float_gemv, float_linear, int8_gemv
from .int4 import Int4Linear
from .int8 import Int8Linear
from .log8 import Log8Linear
from .model import SCHEMES, AlreadyQuantized, QuantReport, is_quantized, model_bytes, quantize_model

__all__ = [
    "SCHEMES",
    "AlreadyQuantized",
    "Int4Linear",
    "Int8Linear",
    "Log8Linear",
    "QuantReport",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "bytes_per_weight",
    "float_gemv",
    "float_linear",
    "int8_gemv",
    "is_quantized",
    "model_bytes",
    "native",
    "quantize_model",
    "relative_error",
    "select",
]  # fmt: skip

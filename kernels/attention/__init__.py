"""Attention over a preallocated KV cache with explicit per-row fill lengths (``seq_lens``).

Layout: ``q`` is ``[B, H_q, n, D]``; ``k_cache``/``v_cache`` are ``[B, H_kv, max_len, D]`` buffers allocated once;
``seq_lens`` is an int32 tensor ``[B]`` giving how many key positions of each row are filled *including* the ``n``
new tokens. Query ``i`` of row ``b`` sits at absolute position ``seq_lens[b] - n + i``. A key position ``j`` is
attended iff ``j < seq_lens[b]`` and (causal) ``j <= pos`` and (sliding window ``W``) ``j > pos - W``; anything
stored at or beyond ``seq_lens[b]`` is never read into the result, whatever it holds (NaN, inf, stale tokens).
``H_q`` must be a multiple of ``H_kv`` (GQA: query head ``h`` reads kv head ``h // (H_q // H_kv)``).

Installed as ``fmchat_kernels.attention`` (the folder is ``kernels/``). This package never imports ``fmchat``: it
depends on torch (and triton on GPU) only.
"""

from .core import append_kv, fmc_attention, triton_available
from .fused import decode_attention_fused
from .reference import reference_attention

__all__ = ["append_kv", "decode_attention_fused", "fmc_attention", "reference_attention", "triton_available"]

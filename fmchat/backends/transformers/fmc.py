"""``--kernel fmc``: fmchat's own attention over a KV cache preallocated for the whole context window.

``FmcCache`` is a transformers ``Cache`` whose layers hold ``[B, H_kv, ctx, D]`` buffers (model dtype, allocated
once) and an int32 ``seq_lens`` tensor per layer; new K/V are written in place by ``fmchat_kernels.attention.append_kv``.
A host-side mirror of the fill lengths (plain ints, advanced by the known chunk length) answers ``get_seq_length``
and bounds the kernel's key range, so nothing in the hot path reads a device tensor on the host.

The attention function registered as ``"fmc"`` masks inside the kernel by absolute position (query ``i`` of an
``n``-token chunk sits at ``seq_len - n + i``; keys ``>= seq_len`` are never read), so no mask tensor is built:
no ``AttentionMaskInterface`` entry is registered, and transformers' mask creation exits early for ``"fmc"``.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from fmchat_kernels.attention import append_kv, fmc_attention

NAME = "fmc"


class FmcLayer(CacheLayerMixin):
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, batch_size: int = 1, shape: tuple[int, int] | None = None, dtype=None, device=None):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.host_lens = [0] * batch_size
        self.seq_lens: torch.Tensor | None = None
        if shape is not None:  # (H_kv, D) known from the config: allocate now, so the reservation shows from the start
            self._allocate(shape[0], shape[1], shape[1], dtype, torch.device(device or "cpu"))

    def _allocate(self, heads: int, k_dim: int, v_dim: int, dtype, device) -> None:
        self.dtype, self.device = dtype, device
        # Not zeroed: a position at or past a row's fill is never read into a result, whatever it holds (the kernels'
        # contract, tests/test_kernels_attention.py fills it with NaN), and every position is written before it is
        # read. Zeroing the whole window (SmolLM2 at 8192 tokens: 2 x 30 x 3 MiB) cost 0.1-0.2 s of each launch
        # before the first token; on the CPU the pages now become resident as the conversation fills them.
        self.keys = torch.empty(self.batch_size, heads, self.max_cache_len, k_dim, dtype=dtype, device=device)
        self.values = torch.empty(self.batch_size, heads, self.max_cache_len, v_dim, dtype=dtype, device=device)
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=device)
        # The attention function finds the fill lengths through the buffer transformers hands it.
        self.keys._fmc_layer = weakref.ref(self)  # weak: no cycle keeps a context-sized buffer alive
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size or key_states.shape[1] != self.keys.shape[1] or key_states.shape[-1] != self.keys.shape[-1]:
            raise ValueError(f"fmc cache holds {tuple(self.keys.shape)}, got new keys {tuple(key_states.shape)}")
        n = key_states.shape[-2]
        if max(self.host_lens) + n > self.max_cache_len:
            raise ValueError(f"fmc KV cache is full: {max(self.host_lens)} + {n} tokens > {self.max_cache_len}")
        start = self.host_lens[0]
        if n and all(x == start for x in self.host_lens):
            # every row at the same fill, known on the host: a plain slice write (the same values append_kv writes, with
            # the same dtype conversion), about 100 times cheaper on the CPU than its scatter (~0.5 ms per call, twice
            # per layer per forward: ~30 ms of every eager token on SmolLM2)
            self.keys[:, :, start : start + n].copy_(key_states)
            self.values[:, :, start : start + n].copy_(value_states)
            self.seq_lens.add_(n)
        else:
            append_kv(self.keys, self.values, key_states, value_states, self.seq_lens)
        self.host_lens = [x + n for x in self.host_lens]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.host_lens) if self.host_lens else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop_to(self, n: int) -> None:
        """Keep the first ``n`` tokens of every row (positions past the fill are left as garbage, never read)."""
        n = max(0, n)
        self.host_lens = [min(x, n) for x in self.host_lens]
        if self.seq_lens is not None:
            self.seq_lens.clamp_(max=n)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.crop_to(self.get_seq_length() + tokens_to_remove)

    def reset(self) -> None:
        self.crop_to(0)


def attention_shape(config) -> dict:
    """Query heads, kv heads, head dim and layer count of a transformers config (its text part)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hq = cfg.num_attention_heads
    return {"q_heads": hq, "kv_heads": getattr(cfg, "num_key_value_heads", None) or hq,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // hq, "layers": cfg.num_hidden_layers}  # fmt: skip


class FmcCache(Cache):
    """Preallocated KV cache for ``--kernel fmc``: one ``FmcLayer`` per decoder layer."""

    def __init__(self, config, max_cache_len: int, batch_size: int = 1, dtype=torch.float32, device="cpu"):
        shape = attention_shape(config)
        layers = [
            FmcLayer(max_cache_len, batch_size, (shape["kv_heads"], shape["head_dim"]), dtype, device)
            for _ in range(shape["layers"])
        ]
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len

    @property
    def seq_lens(self) -> torch.Tensor:
        """Per-row fill (int32, on the cache's device) of the first layer."""
        return self.layers[0].seq_lens

    def seq_lens_list(self) -> list[int]:
        return list(self.layers[0].host_lens)

    def crop_to(self, n: int) -> None:
        for layer in self.layers:
            layer.crop_to(n)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for layer in self.layers for t in (layer.keys, layer.values) if t is not None)


def fmc_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention-interface entry: ``query`` ``[B, H_q, n, D]``; ``key``/``value`` the whole buffers
    returned by ``FmcLayer.update`` (or plain K/V when called without an fmc cache). Returns ``[B, n, H_q, D]``."""
    if kwargs.get("output_attentions"):
        raise ValueError("the fmc kernel does not return attention weights; use --kernel eager")
    step = kwargs.get("fmc_step")
    if step is not None:  # the compiled one-token decode step (backends/compiled.py)
        from .compiled import step_attention

        return step_attention(module, query, key, value, step, scaling, sliding_window)
    ref = getattr(key, "_fmc_layer", None)
    layer = ref() if ref is not None else None
    if layer is not None and layer.keys is key:
        seq_lens, kv_len = layer.seq_lens, max(layer.host_lens)
        exact = min(layer.host_lens) == kv_len  # every row filled to the same length, known on the host
    else:  # no fmc cache (e.g. use_cache=False): every key is filled
        seq_lens = torch.full((key.shape[0],), key.shape[2], dtype=torch.int32, device=key.device)
        kv_len, exact = key.shape[2], True
    causal = getattr(module, "is_causal", True)
    out = fmc_attention(query, key, value, seq_lens, scale=scaling, causal=causal, sliding_window=sliding_window,
                        kv_len=kv_len, exact=exact)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fmc"`` available to transformers (idempotent)."""
    AttentionInterface.register(NAME, fmc_attention_forward)

"""``--compile``: the one-token decode step of the transformers backend under ``torch.compile``.

The step runs the Hugging Face model on one token with fixed shapes: ``input_ids`` ``[1, 1]`` and
``position_ids`` ``[1, 1]`` (preallocated, filled in place), the KV cache passed as the preallocated
``FmcCache`` buffers of ``--kernel fmc`` (``[1, H_kv, ctx, D]`` per layer, never reallocated). Nothing is
marked dynamic, so one graph serves every position: the only length that changes is the per-layer
``seq_lens`` *tensor*, read by the attention custom op below, which the compiler treats as opaque.

``fmchat::decode_attention`` appends the new K/V at ``seq_lens`` and attends over the filled prefix with the
same ``kernels.attention`` code as the eager ``fmc`` path (on CPU it reads the fill length with one cheap
``int()``; on CUDA it leaves the bound to the kernel, so the step stays capturable in a CUDA graph).
Prefill stays eager (chunks of many tokens, through ``FmcCache.update``); the host-side fill mirror of the
cache is advanced by the backend after each compiled step.

CPU only for now: on an H100 the compiled step's greedy tokens differed from eager (CUDA graphs were also
skipped for the mutating custom op), so on CUDA the backend refuses it and decodes eagerly, saying so.

The compile cost is paid once per backend (per model and load options), at load, as a progress step; any
failure there (no C++ compiler, an unsupported backend or model, an error on the warm-up step) leaves the
backend on the eager path with the reason in ``compile_status``.
"""

from __future__ import annotations

import time

import torch

from kernels.attention import append_kv, fmc_attention

# Values of LoadOptions.compile: "off", "on" (= inductor), or any other torch.compile backend name
# ("aot_eager", "eager", ...; useful to tell a compiler problem from a tracing one).
COMPILE_CHOICES = ("off", "on")


@torch.library.custom_op("fmchat::decode_attention", mutates_args=("k_cache", "v_cache", "seq_lens"))
def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """``q`` ``[B, H_q, n, D]``, ``k_new``/``v_new`` ``[B, H_kv, n, D]``: append, attend, return ``[B, n, H_q, D]``."""
    B, n = q.shape[0], q.shape[2]
    if q.is_cuda or B != 1 or n != 1 or sliding_window:
        append_kv(k_cache, v_cache, k_new, v_new, seq_lens)
        kv_len = None if q.is_cuda else int(seq_lens.max())  # CPU: nothing to sync with; bounds the keys read
        out = fmc_attention(q, k_cache, v_cache, seq_lens, scale=scale, causal=True,
                            sliding_window=sliding_window or None, kv_len=kv_len)  # fmt: skip
        return out.transpose(1, 2).contiguous().clone()
    # CPU, one row, one token: write at the fill, then plain attention over the filled prefix (no mask needed:
    # the new token sees every cached key). A handful of ops, no fp32 copy of the cache.
    p = int(seq_lens[0])
    k_cache[:, :, p] = k_new[:, :, 0]
    v_cache[:, :, p] = v_new[:, :, 0]
    seq_lens.add_(1)
    k = k_cache[:, :, : p + 1]
    v = v_cache[:, :, : p + 1]
    Hkv, D = k.shape[1], q.shape[-1]
    qg = q.reshape(1, Hkv, q.shape[1] // Hkv, D).float()  # the query heads sharing a kv head, as rows
    scores = torch.matmul(qg, k.transpose(-1, -2).float()).mul_(scale)  # [1, H_kv, G, p + 1], fp32
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float()).to(q.dtype)  # [1, H_kv, G, D]
    return out.reshape(1, 1, q.shape[1], v.shape[-1])


@decode_attention.register_fake
def _decode_attention_fake(q, k_new, v_new, k_cache, v_cache, seq_lens, scale, sliding_window):
    B, H, n, D = q.shape
    return q.new_empty(B, n, H, v_cache.shape[-1])


def step_attention(module, query, key, value, step, scaling, sliding_window):
    """The ``fmc`` attention entry during a compiled step (``fmc_step`` kwarg): this layer's cache buffers."""
    k_caches, v_caches, lens = step
    i = module.layer_idx
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = torch.ops.fmchat.decode_attention(query, key, value, k_caches[i], v_caches[i], lens[i], scale, int(sliding_window or 0))
    return out, None


class CompiledStep:
    """One compiled one-token forward over an ``FmcCache``. Call ``warm_up`` once (compiles); then ``__call__``."""

    def __init__(self, model, cache, device: str, choice: str = "on"):
        if device != "cpu":
            # Checked on an H100 (docs/decode.md): greedy tokens differed from eager there, so stay eager on GPU.
            raise NotImplementedError("the compiled decode step is CPU-only for now (on CUDA it did not match eager)")
        self.model = model
        self.cache = cache
        self.device = device
        self.layers = list(cache.layers)
        self.k = [layer.keys for layer in self.layers]
        self.v = [layer.values for layer in self.layers]
        self.lens = [layer.seq_lens for layer in self.layers]
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        backend = "inductor" if choice == "on" else choice
        self.backend = backend
        self.skip_guards = False  # set after warm-up
        kw: dict = {}
        if backend == "inductor" and device == "cuda":
            kw["mode"] = "reduce-overhead"  # CUDA graphs: one launch per token
        elif backend == "inductor":
            kw["options"] = {"freezing": True}  # weights as constants: prepacked (oneDNN) linear layers on CPU
        self.fn = torch.compile(self._step, backend=backend, fullgraph=True, dynamic=False, **kw)

    def _step(self, ids, pos, k, v, lens):
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, fmc_step=(k, v, lens))
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        self.ids.fill_(token)
        self.pos.fill_(position)
        if self.skip_guards:  # one graph, fixed inputs: its guards cannot fail, so do not evaluate them per token
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self.fn(self.ids, self.pos, self.k, self.v, self.lens)
        else:
            logits = self.fn(self.ids, self.pos, self.k, self.v, self.lens)
        for layer in self.layers:  # the host-side mirror of seq_lens (the op advanced the tensors)
            layer.host_lens = [x + 1 for x in layer.host_lens]
        return logits.clone() if self.device == "cuda" else logits  # CUDA graphs reuse their output buffer

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (two calls, so a recompile on the second would show), then empty the cache. Returns seconds."""
        t0 = time.perf_counter()
        self.cache.crop_to(0)
        try:
            for p in range(3):
                self(0, p)
        finally:
            self.cache.crop_to(0)
        self.skip_guards = True
        return time.perf_counter() - t0

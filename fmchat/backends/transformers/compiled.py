"""``--compile``: the one-token decode step of the transformers backend under ``torch.compile``.

The step runs the Hugging Face model on one token: ``input_ids`` and ``position_ids`` ``[1, 1]`` (preallocated,
filled in place) and the preallocated ``FmcCache`` buffers of ``--kernel fmc`` (``[1, H_kv, ctx, D]`` per layer,
never reallocated), all marked static. The one thing that varies is ``n``, the fill after this token, passed as a
Python int and traced as a *symbolic* size (``dynamic=True``): one graph serves every position, and attention
work grows with the fill, not with the window.

Everything is inside that one inductor graph: the K/V append (an in-place write of one row of each buffer), the
attention over the filled rows (``fmchat_kernels.attention.decode_attention_fused``: broadcasts and sums that inductor
turns into fused loops converting the cache on the fly), and, with ``--quant int8``, the weight GEMVs (``fmchat_kernels.quant.int8_gemv``: int8
read once, converted in registers). After warm-up, calls skip Dynamo's frame evaluation (``_direct_entry``).
Prefill stays eager (chunks of many tokens, through ``FmcCache.update``); the host-side fill mirror of the cache
is advanced after each compiled step.

CPU only for now: on an H100 an earlier version of this step gave greedy tokens that differed from eager, so on
CUDA the backend refuses it and decodes eagerly, saying so.

The compile cost is paid once per backend (per model and load options), at load, as a progress step; any
failure there (no C++ compiler, an unsupported backend or model, an error on the warm-up step) leaves the
backend on the eager path with the reason in ``compile_status``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import types

import torch

from fmchat_kernels.attention import decode_attention_fused
from fmchat_kernels.quant import float_gemv

from .compat import CACHE_ARG

# Values of RunConfig.compile: "auto" (the compiled step when it works here, prepared in the background; eager
# meanwhile), "eager", "compiled" (= inductor, at load), the old names "off" (= eager) and "on" (= compiled), or, for
# the backend factory only, any other torch.compile backend name ("aot_eager", ...; useful to tell a compiler
# problem from a tracing one).
COMPILE_CHOICES = ("auto", "eager", "compiled")
ALIASES = {"off": "eager", "on": "compiled"}


def decode_choice(value: str | None) -> str:
    """The canonical decode path for a RunConfig.compile value ("off"/"on" are the names before "auto")."""
    value = value or "auto"
    return ALIASES.get(value, value)


def step_attention(module, query, key, value, step, scaling, sliding_window):
    """The ``fmc`` attention entry during a compiled step (``fmc_step`` kwarg): append this token's K/V to the
    layer's preallocated buffers at the fill, then attend over the filled prefix, in plain PyTorch ops that
    inductor fuses into the step's graph. ``n`` (the fill after this token) is a symbolic int: one graph
    serves every length, and the work grows with the fill, not with the window."""
    k_caches, v_caches, lens, n = step
    i = module.layer_idx
    kc, vc = k_caches[i], v_caches[i]
    kc[:, :, n - 1 : n] = key  # in place into the buffer (inductor writes the one row)
    vc[:, :, n - 1 : n] = value
    lens[i].add_(1)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    lo = 0
    if sliding_window:  # keys j with j > position - window, position = n - 1
        lo = torch.sym_max(0, n - int(sliding_window))
    return decode_attention_fused(query, kc[0, :, lo:n], vc[0, :, lo:n], scale), None


class DecodeLinear(torch.nn.Linear):
    """``nn.Linear`` whose one-row calls inside the compiled step are ``fmchat_kernels.quant.float_gemv`` (bf16/fp16
    weights); everything else (eager prefill, fp32 weights, several rows) is ``nn.Linear``'s own forward. Swapped
    in by class (weights, hooks and state dict untouched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # is_dynamo_compiling, not is_compiling: the latter reads a process-wide flag that is also true for a thread
        # decoding eagerly while another thread compiles (the background compile of ``--compile auto``).
        if torch.compiler.is_dynamo_compiling() and x.numel() == self.in_features and self.weight.dtype in (torch.bfloat16, torch.float16):
            return float_gemv(x.reshape(1, -1), self.weight, self.bias).reshape(x.shape[:-1] + (self.out_features,))
        return super().forward(x)


def use_decode_linears(model: torch.nn.Module) -> None:
    """Make every plain ``nn.Linear`` of ``model`` a ``DecodeLinear``."""
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = DecodeLinear


def _step(model, ids, pos, k, v, lens, n):
    """The traced function: the model on one token, attention through ``step_attention``."""
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, fmc_step=(k, v, lens, n))
    return out.logits[0, -1].float()


_STEPS = itertools.count(1)

INDUCTOR_OPTIONS = {
    # Weights as constants (prepacked oneDNN linear layers for float32 on CPU).
    "freezing": True,
    # Inductor inlines a pointwise producer into each reduction that reads it unless its loop body is "large"
    # (more than 50 ops on CPU by default). A one-row GEMV is a reduction per output row, so the RMSNorm before
    # q/k/v, gate/up and the output head (rsqrt, weight, residual) was recomputed for every output row: 49152
    # times for the head. At 10 ops the normalised row is computed once into a buffer. Measured on the 2-core
    # CPU (docs/decode.md): 15.0 -> 11.8 ms per token for compiled+int8 at 1k context; 20 was as slow as 50,
    # 5 was slower than 10.
    "realize_opcount_threshold": 10,
    # No per-call shape/stride asserts on the ~670 inputs (the inputs are the same tensors on every call).
    "size_asserts": False,
}


def _own_step_function():
    """A copy of ``_step`` with a code object of its own. Dynamo keeps compiled entries per code object, so each
    CompiledStep (several backends in one process: a reload, ``bench decode``) gets exactly one entry of its own,
    which ``_direct_entry`` can find without guessing."""
    code = _step.__code__.replace(co_name=f"_step_{next(_STEPS)}")
    return types.FunctionType(code, _step.__globals__, code.co_name)


class CompiledStep:
    """One compiled one-token forward over an ``FmcCache``. Call ``warm_up`` once (compiles); then ``__call__``."""

    def __init__(self, model, cache, device: str, choice: str = "on"):
        if device != "cpu":
            # Checked on an H100 (docs/decode.md): greedy tokens differed from eager there, so stay eager on GPU.
            raise NotImplementedError("the compiled decode step is CPU-only for now (on CUDA it did not match eager)")
        self.model = model
        self.device = device
        self.bind(cache)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        torch._dynamo.mark_static(self.ids)
        torch._dynamo.mark_static(self.pos)
        backend = "inductor" if decode_choice(choice) in ("auto", "compiled") else choice
        self.backend = backend
        self.direct = None  # set after warm-up: see _direct_entry
        kw: dict = {}
        if backend == "inductor":
            kw["options"] = dict(INDUCTOR_OPTIONS)
        # dynamic=True so that the int ``n`` (the fill after this token) is symbolic from the first trace: one graph
        # for every position >= 1. Tensor inputs are marked static above.
        use_decode_linears(model)
        self.step = _own_step_function()
        self.fn = torch.compile(self.step, backend=backend, fullgraph=True, dynamic=True, **kw)

    def bind(self, cache) -> None:
        """Run on ``cache``'s buffers from now on. The graph takes them as inputs (never as constants), so a step
        compiled over one FmcCache serves another of the same shapes: the background compile of ``--compile auto``
        works on a scratch cache while the chat decodes eagerly on its own, then binds the step to the chat's."""
        layers = list(cache.layers)
        if hasattr(self, "layers"):
            old = [(tuple(t.shape), t.dtype, t.stride()) for layer in self.layers for t in (layer.keys, layer.values)]
            new = [(tuple(t.shape), t.dtype, t.stride()) for layer in layers for t in (layer.keys, layer.values)]
            if old != new:
                raise ValueError("the compiled step was built for KV buffers of other shapes")
        self.cache = cache
        self.layers = layers
        self.k = [layer.keys for layer in self.layers]
        self.v = [layer.values for layer in self.layers]
        self.lens = [layer.seq_lens for layer in self.layers]
        for t in self.k + self.v:
            torch._dynamo.mark_static(t)  # the buffers never change shape; only the fill ``n`` is symbolic

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Decode ``token`` at ``position`` (>= 1: the cache holds ``position`` tokens)."""
        self.ids.fill_(token)
        self.pos.fill_(position)
        if self.direct is not None:
            logits = self.direct(self.model, self.ids, self.pos, self.k, self.v, self.lens, position + 1)
        else:
            logits = self.fn(self.model, self.ids, self.pos, self.k, self.v, self.lens, position + 1)
        for layer in self.layers:  # the host-side mirror of seq_lens (the graph advanced the tensors)
            layer.host_lens = [x + 1 for x in layer.host_lens]
        return logits

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile, run a few positions (a recompile would show as time here), then empty the cache. Returns seconds."""
        t0 = time.perf_counter()
        self.cache.crop_to(0)
        try:
            self.model(input_ids=self.ids, **{CACHE_ARG: self.cache}, use_cache=True, logits_to_keep=1,
                       cache_position=torch.zeros(1, dtype=torch.long), position_ids=self.pos)  # fmt: skip
            # Python floats (the attention scale, the norms' eps) as constants, not as 0-d tensor inputs.
            with torch._dynamo.config.patch(specialize_float=True):
                for p in range(1, 4):
                    self(0, p)
            self.direct = self._direct_entry()
            if self.direct is not None:  # check it: the same step through both entries gives the same logits
                self.cache.crop_to(3)
                a = self(0, 3)
                self.cache.crop_to(3)
                direct, self.direct = self.direct, None
                b = self(0, 3)
                self.direct = direct if torch.equal(a, b) else None
        finally:
            self.cache.crop_to(0)
        return time.perf_counter() - t0

    def _direct_entry(self):
        """The function Dynamo compiled for ``_step`` (its transformed bytecode calling the inductor graph), called
        without Dynamo's per-call frame evaluation and guard checks: ~1.7 ms per token for this model on the 2-core
        CPU, since the guards cover every module and parameter. Safe here because nothing a guard checks can change:
        one graph (fullgraph), inputs of fixed shape that are the same tensor objects on every call, ``n`` symbolic,
        and the model is frozen (inference only). None when the entry cannot be found (then calls go through
        Dynamo, as before)."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            entries = _debug_get_cache_entry_list(self.step.__code__)
        except Exception:  # noqa: BLE001 - a private API: without it, stay on the guarded path
            return None
        if len(entries) != 1:
            return None
        return types.FunctionType(entries[0].code, self.step.__globals__, self.step.__name__)


class StepBuild:
    """Builds one ``CompiledStep`` through the on-disk cache (``compile_cache``): load the cached artifact when
    there is one for this key, compile (a cache hit then), check, and save the artifact when the entry was missing,
    stale or corrupt. ``run()`` builds in the calling thread (``--compile compiled``, or ``auto`` with a cached
    entry); ``start()`` on a daemon thread (``auto`` without one), while the chat decodes eagerly on its own cache.

    ``make_step`` returns the (not yet warmed-up) CompiledStep; ``entry`` is the cache entry (None: no caching,
    e.g. a torch.compile backend other than inductor). Readable from any thread: ``phase``, ``error``, ``step``,
    ``cached`` (the compile was served by the saved artifact), ``seconds``, ``done`` (an Event)."""

    def __init__(self, make_step, entry=None, progress=None, idle=None):
        self.make_step = make_step
        # idle() -> True when the chat has not run the model for a moment: a background build starts only then.
        # Tracing holds the GIL and compiling takes the cores, so a build running under a reply slows it several
        # times (measured: 0.3 tok/s against ~30 on the 2-core CPU); between replies it costs nobody anything.
        self.idle = idle
        self.entry = entry
        self.progress = progress  # progress(step, fraction) of the load, or None
        self.phase = "waiting"
        self.error: str | None = None
        self.step: CompiledStep | None = None
        self.cached = False
        self.rebuilt: str | None = None  # why a saved entry was discarded and rebuilt
        self.saved = False
        self.seconds = 0.0
        self.expected = entry.expected_seconds() if entry is not None else None
        self.started: float | None = None
        self.done = threading.Event()
        self.thread = None
        self.cancelled = False  # set by cancel(): a build still waiting for the compile lock does not begin
        self.listeners: list = []  # fn() called (on the compile thread) at each phase and when done

    def _notify(self) -> None:
        for fn in list(self.listeners):
            with contextlib.suppress(Exception):  # a display callback must not break the compile
                fn()

    def cancel(self) -> None:
        self.cancelled = True

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return self.seconds if self.done.is_set() else time.perf_counter() - self.started

    def fraction(self) -> float | None:
        """An estimate from the last compile of this key on this machine (None when there was none)."""
        if self.done.is_set():
            return 1.0
        if not self.expected or self.started is None:
            return None
        return min(0.99, self.elapsed() / self.expected)

    def _say(self, phase: str) -> None:
        self.phase = phase
        if self.progress is not None:
            self.progress(f"decode step: {phase}", None)
        self._notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run_when_idle, name="fmchat-compile", daemon=True)
        self.thread.start()

    def _run_when_idle(self) -> None:
        if self.idle is not None and not self.idle():
            self._say("waiting for the chat to be idle")
            while not self.idle() and not self.cancelled:
                time.sleep(0.2)
        self.run()

    def run(self) -> CompiledStep | None:
        from . import compile_cache as cc

        self.started = time.perf_counter()
        try:
            with cc.COMPILE_LOCK, cc.inductor_dir():
                if self.cancelled:
                    raise RuntimeError("cancelled (the backend was closed)")
                loaded = False
                if self.entry is not None and self.entry.exists():
                    self._say("loading the cached step")
                    try:
                        data = self.entry.read()
                        cc.load_into_torch(data)
                        loaded = True
                    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, stale: rebuild it
                        self.rebuilt = f"{type(exc).__name__}: {exc}"[:200]
                        self.entry.discard()
                cc.clear_recorded_artifacts()
                hits = cc.cache_hits()
                self._say("compiling (torch.compile, inductor)" if not loaded else "compiling from the cached step")
                step = self.make_step()
                step.warm_up()
                self.cached = loaded and cc.cache_hits() > hits
                if self.entry is not None and not self.cached:
                    self._say("saving the compiled step for the next launch")
                    try:
                        data = cc.save_from_torch()
                        if data:
                            self.entry.write(data, time.perf_counter() - self.started)
                            self.saved = True
                    except Exception as exc:  # noqa: BLE001 - no cache (read-only dir, disk full): still compiled
                        self.rebuilt = (self.rebuilt or "") + f" (not saved: {type(exc).__name__}: {exc})"[:200]
            self.step = step
            self.phase = "ready"
        except Exception as exc:  # noqa: BLE001 - any compiler error means: decode eagerly, and report it
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.error = f"{type(exc).__name__}: {first}"
            self.phase = "failed"
        finally:
            self.seconds = time.perf_counter() - self.started
            self.done.set()
            self._notify()
        return self.step

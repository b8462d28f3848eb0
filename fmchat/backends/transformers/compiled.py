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
from fmchat_kernels.attention.fused import prepare_compile
from fmchat_kernels.quant import float_gemv, float_linear

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
    i = module.layer_idx if len(k_caches) > 1 else 0  # (the AOT layer program gets this layer's buffers only)
    kc, vc = k_caches[i], v_caches[i]
    kc[:, :, n - 1 : n] = key  # in place into the buffer (inductor writes the one row)
    vc[:, :, n - 1 : n] = value
    lens[i].add_(1)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    lo = 0
    # keys j with j > position - window, position = n - 1; a window no shorter than the buffer never cuts (Phi-3.5's
    # 262144 over any context this cache holds), and left out it leaves torch.export nothing to prove about n
    if sliding_window and int(sliding_window) < kc.shape[2]:
        lo = torch.sym_max(0, n - int(sliding_window))
    return decode_attention_fused(query, kc[0, :, lo:n], vc[0, :, lo:n], scale), None


# Set (per thread) while ``AotStep.export`` traces the step: torch.export's non-strict trace is not Dynamo, and the
# process-wide ``torch.compiler.is_exporting()`` would also be true for a thread decoding eagerly meanwhile.
_TRACE = threading.local()


def _tracing_step() -> bool:
    """True while this thread traces the decode step (Dynamo for ``torch.compile``, ``AotStep.export``)."""
    return torch.compiler.is_dynamo_compiling() or getattr(_TRACE, "on", False)


class DecodeLinear(torch.nn.Linear):
    """``nn.Linear`` whose one-row calls inside the compiled step are ``fmchat_kernels.quant.float_gemv`` (bf16/fp16
    weights), and whose eager calls are ``float_linear`` (the bf16 GEMM, or for many rows the measured prefill path:
    fp32 GEMMs over chunks of the weight on a CPU without bf16 GEMM instructions). Swapped in by class at every CPU
    load (weights, hooks and state dict untouched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # is_dynamo_compiling, not is_compiling: the latter reads a process-wide flag that is also true for a thread
        # decoding eagerly while another thread compiles (the background compile of ``--compile auto``).
        if _tracing_step() and x.numel() == self.in_features and self.weight.dtype in (torch.bfloat16, torch.float16):
            return float_gemv(x.reshape(1, -1), self.weight, self.bias).reshape(x.shape[:-1] + (self.out_features,))
        return float_linear(x, self.weight, self.bias)


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
        prepare_compile()
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

    kind = "jit"

    def covers(self, position: int) -> bool:  # one graph for every fill (the backend checks that the cache has room)
        return position >= 1

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

# AOTInductor: the step exported once (torch.export) and compiled ahead of time into a package (a shared library
# with inductor's kernels and its C++ wrapper) without the weights, which are bound at load to the model's own
# tensors. Loading a saved package takes milliseconds (no Dynamo trace, no inductor), so a launch that finds one
# decodes compiled from its first reply (docs/decode.md).
AOT_OPTIONS = {
    "realize_opcount_threshold": INDUCTOR_OPTIONS["realize_opcount_threshold"],
    "size_asserts": False,
    "aot_inductor.package_constants_in_so": False,  # weights stay the model's tensors (bound at load, not copied)
}
# How far the compiled step's logits may be from the eager step's (relative L2 norm) at the check after a load: a
# package that is not this model's step gives unrelated logits (~1.4). The same step in other rounding: float32
# ~1e-6; bfloat16 1e-2 on 2 layers, 0.01-0.3 on SmolLM2's 30 (activations rounded to bf16 at other places; the
# torch.compile step differs from eager as much). Quantized weights: the step's int8/int4 one-row kernel is not the
# eager one (select.py) and sums in another order: 3e-3 in float32 on SmolLM2 int8, so those get AOT_CHECK_QUANT.
AOT_CHECK = {torch.float32: 1e-3, torch.float16: 0.5, torch.bfloat16: 0.5}
AOT_CHECK_QUANT = 0.05


class _LayerProgram(torch.nn.Module):
    """One decoder layer on one token, as a program for torch.export: hidden state in and out, the token's rotary
    ``cos``/``sin`` as inputs (computed once per token by the model's own rotary module, outside: some make
    data-dependent choices, e.g. Phi-3.5's LongRoPE by position), ``step_attention`` appending to ``k``/``v``. The
    fill ``n`` is the length of ``fill`` (a view of a preallocated buffer), a symbolic size of the program. Exported
    once from the first layer; every layer runs the same compiled code bound to its own weights and KV buffers."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h, cos, sin, pos, fill, k, v, lens):
        return self.layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin), use_cache=False,
                          fmc_step=([k], [v], [lens], fill.shape[0]))  # fmt: skip


class _NoRotary(torch.nn.Module):
    """Stands in for the rotary module in ``_HeadProgram``'s layer-less view, where nothing reads its output."""

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(()), x.new_zeros(())


class _HeadProgram(torch.nn.Module):
    """The model after its last layer (final norm, output head, and whatever the architecture does to the logits:
    Gemma's soft-capping, Cohere's scale), traced through the model's own forward on a view of it that has no
    layers: ``inputs_embeds`` in, float32 logits of the one token out."""

    def __init__(self, model):
        super().__init__()
        import copy

        inner = copy.copy(model.model)  # shallow views: the model itself (shared with the chat) is not changed
        inner._modules = {**model.model._modules, "layers": torch.nn.ModuleList()}
        if "rotary_emb" in inner._modules:  # unused without layers; its tensor attributes (LongRoPE's long_inv_freq)
            inner._modules["rotary_emb"] = _NoRotary()  # would become unnamed constants of the package
        outer = copy.copy(model)
        outer._modules = {**model._modules, "model": inner}
        self.m = outer

    def forward(self, h):
        return self.m(inputs_embeds=h, use_cache=False, logits_to_keep=1).logits[0, -1].float()


def _tensors(module) -> dict:
    """Every parameter and buffer of ``module`` by name, tied ones under each of their names."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _layer_signature(layer) -> tuple:
    named = _tensors(layer).items()
    return (type(layer), getattr(layer, "attention_type", None), tuple((n, tuple(t.shape), t.dtype) for n, t in named))


_EXTRACTION_LOCK = threading.Lock()


@contextlib.contextmanager
def _extraction_dir():
    """Where torch's package loader unpacks each program it opens (a ``aotinductor_*`` folder of ``$TMPDIR``, which it
    deletes only when the loader object is destroyed: never, for a process that leaves through ``os._exit``, and a
    regional step opens one per layer: 31 folders, ~50 MB, left in /tmp per launch of the default model). The loader
    has mapped its shared library by the time its constructor returns, so a folder of our own, set as ``$TMPDIR``
    while the loaders are built and deleted right after, leaves nothing behind."""
    import os
    import shutil
    import tempfile

    with _EXTRACTION_LOCK:
        place = tempfile.mkdtemp(prefix="fmchat-aot-load-")
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = place
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = before
            shutil.rmtree(place, ignore_errors=True)


class AotStep:
    """The one-token step compiled ahead of time (AOTInductor) over an ``FmcCache``, by region: one decoder layer
    and the head are exported (``export()``) and compiled (``compile_to(path)``, one package holding both) once per
    machine, so the compile costs the same for 2 layers or 40; at each launch ``load(path)`` binds the layer
    program once per layer to that layer's weights and KV buffers (milliseconds), ``warm_up()`` checks it against
    eager, then ``__call__``: the token's embedding (a row lookup) and rotary ``cos``/``sin`` (the model's modules,
    eager), the layers in turn (~2 us of call overhead each), the head. The same traced
    computation as ``CompiledStep`` (``step_attention``, ``DecodeLinear``, the int8 GEMVs)."""

    # in the decode path string, "compiled (inductor AOT, ...)"; the torch.compile fallback says "compiled (inductor,
    # ...)" (without a visible difference a 3.8B bench run once took the fallback unnoticed)
    backend = "inductor AOT"
    kind = "aot"

    def __init__(self, model, cache, device: str):
        import inspect

        if device != "cpu":
            raise NotImplementedError("the compiled decode step is CPU-only for now (on CUDA it did not match eager)")
        window = getattr(model.config, "sliding_window", None)
        if isinstance(window, int) and 0 < window < cache.max_cache_len:
            # the window's slice [max(0, n - w), n) has a length torch.export cannot bound from n's range (it asks to
            # prove e.g. that it is never 1); torch.compile guards it instead, so such models take that path
            raise NotImplementedError(f"a sliding window ({window} tokens) shorter than the context is not exported yet")
        inner = model.model
        self.layer_modules = list(inner.layers[: model.config.num_hidden_layers])
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None or "layer_type" in inspect.signature(rotary.forward).parameters:
            raise NotImplementedError("the model has no single rotary embedding for all its layers")
        if len({_layer_signature(layer) for layer in self.layer_modules}) != 1:
            raise NotImplementedError("the model's layers differ in kind or weight shapes (one layer program serves all)")
        self.model = model
        self.device = device
        use_decode_linears(model)
        self.embed = inner.embed_tokens
        self.rotary = rotary
        self.layer_program = _LayerProgram(self.layer_modules[0]).eval()
        self.head_program = _HeadProgram(model).eval()
        self.bind(cache)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.fill = torch.zeros(self.ctx, dtype=torch.int8, device=device)
        self.layers_run = None  # one loaded layer program per layer, bound to its weights (``load``)
        self.head_run = None

    bind = CompiledStep.bind

    @property
    def ctx(self) -> int:
        return int(self.k[0].shape[2])

    @property
    def max_fill(self) -> int:
        # torch.export guards the fill below the buffer length (at n == ctx the slice of the filled rows is the
        # whole buffer, a case it specializes): the very last row of a full cache is decoded eagerly.
        return self.ctx - 1

    def covers(self, position: int) -> bool:
        return 1 <= position and position + 1 <= self.max_fill

    def export(self) -> dict:
        """The two programs (torch.export, strict: its non-strict trace is not thread-safe and this runs beside the
        chat's eager forward): ``{"layer": ..., "head": ...}``."""
        import warnings

        from torch.export import Dim

        n = Dim("n", min=2, max=self.max_fill)
        prepare_compile()
        # Said by torch's trace of transformers' model, about transformers' own code (its output-capturing collector,
        # a torch.jit helper); nothing the user can act on.
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method. is deprecated", category=DeprecationWarning)
        with torch.no_grad():
            h = self.embed(self.ids)
            cos, sin = self.rotary(h, position_ids=self.pos)
        _TRACE.on = True
        try:
            with torch.no_grad():
                layer = torch.export.export(self.layer_program, (h, cos, sin, self.pos, self.fill[:2], self.k[0], self.v[0], self.lens[0]),
                                            dynamic_shapes=(None, None, None, None, {0: n}, None, None, None), strict=True)  # fmt: skip
                head = torch.export.export(self.head_program, (h,), strict=True)
            return {"layer": layer, "head": head}
        finally:
            _TRACE.on = False

    def compile_to(self, programs: dict, path) -> None:
        """Compile each program (AOTInductor) and package them together at ``path``."""
        import warnings

        from torch._inductor import aot_compile
        from torch._inductor.package import package_aoti

        # torch 2.13 pickles its own tree specs with a deprecated isinstance check while packaging (not ours to fix)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        files = {}
        for name, program in programs.items():
            args, kwargs = program.example_inputs
            options = {**AOT_OPTIONS, "aot_inductor.package": True}
            files[name] = aot_compile(program.module(check_guards=False), args, kwargs, options=options)
        package_aoti(str(path), files)

    @staticmethod
    def _open(path, name: str, tensors: dict):
        """One program of the package, its constants (weights) bound to ``tensors`` (the model's own, no copy)."""
        # torch's C++ package loader, as ``aoti_load_package`` builds it, without the device check that function runs
        # first: it compiles test programs to find the CPU's vector ISA (1.3 s of a 4.8 s launch here), which the
        # cache key already pins (``cpu_capability``)
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(str(path), name, False, 1, -1)
        except (AttributeError, TypeError):  # another torch: its public loader
            from torch._inductor.package import load_package

            loader = load_package(str(path), name).loader
        wanted = loader.get_constant_fqns()
        missing = [f for f in wanted if f not in tensors]
        if missing:
            raise ValueError(f"the compiled step needs constants the model does not have: {missing[:3]}")
        # (constants, use_inactive, check_full_update, user_managed: the model's own tensors, no copy, allow_h2d_copy)
        loader.load_constants({f: tensors[f] for f in wanted}, False, True, True, False)
        return loader

    def load(self, path) -> None:
        """Load the package: the head once, the layer program once per layer with that layer's weights."""
        with _extraction_dir():
            self.layers_run = [self._open(path, "layer", {f"layer.{k}": t for k, t in _tensors(layer).items()})
                               .boxed_run for layer in self.layer_modules]  # fmt: skip
            self.head_run = self._open(path, "head", _tensors(self.head_program))

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Decode ``token`` at ``position`` (the cache holds ``position`` tokens; ``covers(position)``)."""
        self.ids.fill_(token)
        self.pos.fill_(position)
        h = self.embed(self.ids)
        cos, sin = self.rotary(h, position_ids=self.pos)
        fill, pos = self.fill[: position + 1], self.pos
        for run, k, v, lens in zip(self.layers_run, self.k, self.v, self.lens):
            h = run([h, cos, sin, pos, fill, k, v, lens])[0]
        out = self.head_run.boxed_run([h])
        for layer in self.layers:  # the host-side mirror of seq_lens (the step advanced the tensors)
            layer.host_lens = [x + 1 for x in layer.host_lens]
        return out[0]

    @torch.inference_mode()
    def _eager(self, token: int, position: int) -> torch.Tensor:
        self.ids.fill_(token)
        self.pos.fill_(position)
        out = self.model(input_ids=self.ids, **{CACHE_ARG: self.cache}, use_cache=True, logits_to_keep=1,
                         cache_position=torch.full((1,), position, dtype=torch.long), position_ids=self.pos)  # fmt: skip
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Check the loaded step against the eager forward on a few positions of this cache (a package that does
        not belong to this model, or is wrong, raises), then empty the cache. Returns seconds."""
        t0 = time.perf_counter()
        from fmchat_kernels.quant.common import QuantizedLinear

        tol = AOT_CHECK.get(self.k[0].dtype, 0.1)
        if any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
            tol = max(tol, AOT_CHECK_QUANT)
        # ordinary tokens spread over the vocabulary: after a run of special tokens (ids 1, 2, 3...) SmolLM2's bf16
        # logits from this step differed from eager at one position by more than unrelated logits do (3.1; 0.7-2%
        # with these tokens): bf16 rounding on a degenerate input, not a wrong step
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 32000)
        tokens = [(vocab // 3 + 7919 * i) % vocab for i in range(4)]
        try:
            self.cache.crop_to(0)
            self._eager(tokens[0], 0)
            for p in range(1, 4):
                got = self(tokens[p], p)
                self.cache.crop_to(p)
                want = self._eager(tokens[p], p)
                err = float((got - want).norm() / want.norm().clamp_min(1e-6))
                if not err < tol:  # (also catches NaN)
                    raise ValueError(f"the compiled step's logits differ from eager at position {p} (relative error {err:.2g})")
        finally:
            self.cache.crop_to(0)
        return time.perf_counter() - t0


def cc_lock():
    from . import compile_cache as cc

    return cc.COMPILE_LOCK


class StepBuild:
    """Builds one ``CompiledStep`` through the on-disk cache (``compile_cache``): load the cached artifact when
    there is one for this key, compile (a cache hit then), check, and save the artifact when the entry was missing,
    stale or corrupt. ``run()`` builds in the calling thread (``--compile compiled``, or ``auto`` with a cached
    entry); ``start()`` on a daemon thread (``auto`` without one), while the chat decodes eagerly on its own cache.

    ``make_step`` returns the (not yet warmed-up) CompiledStep; ``entry`` is the cache entry (None: no caching,
    e.g. a torch.compile backend other than inductor). Readable from any thread: ``phase``, ``error``, ``step``,
    ``cached`` (the compile was served by the saved artifact), ``seconds``, ``done`` (an Event)."""

    def __init__(self, make_step, entry=None, progress=None, idle=None, make_aot=None, aot_entry=None):
        self.make_step = make_step
        # AOTInductor first (a saved package loads in milliseconds); torch.compile when it fails (the reason is kept
        # in ``aot_error``). ``make_aot`` returns a not-yet-loaded AotStep; ``aot_entry`` is its cache entry.
        self.make_aot = make_aot
        self.aot_entry = aot_entry
        self.aot_error: str | None = None
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
        first = aot_entry if make_aot is not None and aot_entry is not None else entry
        self.expected = first.expected_seconds() if first is not None else None
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

    def load_saved(self) -> CompiledStep | AotStep | None:
        """Only the saved ahead-of-time step, in the calling thread: the step when this machine compiled one for this
        key (loaded and checked in well under a second), else None (nothing compiled here; a stale or corrupt
        entry is discarded, so that a later ``start()``/``run()`` rebuilds it)."""
        if self.make_aot is None or self.aot_entry is None or not self.aot_entry.exists():
            return None
        self.started = time.perf_counter()
        step = None
        try:
            with cc_lock():
                step = self._load_aot()
        except Exception as exc:  # noqa: BLE001 - a model the step cannot be built for: say so, stay eager
            self.rebuilt = f"{type(exc).__name__}: {exc}"[:200]
        if step is not None:
            self.entry = self.aot_entry
            self.step = step
            self.phase = "ready"
            self.seconds = time.perf_counter() - self.started
            self.done.set()
        return step

    def _load_aot(self) -> AotStep | None:
        entry = self.aot_entry
        if entry is None or not entry.exists():
            return None
        self._say("loading the compiled step")
        step = self.make_aot()
        try:
            entry.read()  # checked against its meta.json (size, sha256, key) before the loader sees it
            step.load(entry.artifacts)
            step.warm_up()
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, stale, wrong: rebuild it
            self.rebuilt = f"{type(exc).__name__}: {exc}"[:200]
            entry.discard()
            return None
        self.cached = True
        return step

    def _build_aot(self) -> AotStep | None:
        """Export, compile ahead of time, load, check and save. None (reason in ``aot_error``) on any failure."""
        import tempfile
        from pathlib import Path

        try:
            step = self.make_aot()
            self._say("compiling (torch.export of one layer and the head)")
            program = step.export()
            self._say("compiling (AOTInductor, C++ build)")
            with tempfile.TemporaryDirectory(prefix="fmchat-aot-") as tmp:
                path = Path(tmp) / "step.pt2"
                step.compile_to(program, path)
                del program
                step.load(path)
                step.warm_up()
                if self.aot_entry is not None:
                    self._say("saving the compiled step for the next launch")
                    try:
                        self.aot_entry.write(path.read_bytes(), time.perf_counter() - self.started)
                        self.saved = True
                    except Exception as exc:  # noqa: BLE001 - no cache (read-only dir, disk full): still compiled
                        self.rebuilt = (self.rebuilt or "") + f" (not saved: {type(exc).__name__}: {exc})"[:200]
            return step
        except Exception as exc:  # noqa: BLE001 - fall back to torch.compile, keeping the reason
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.aot_error = f"{type(exc).__name__}: {first}"
            return None

    def run(self) -> CompiledStep | None:
        from . import compile_cache as cc

        self.started = time.perf_counter()
        try:
            with cc.COMPILE_LOCK, cc.inductor_dir():
                if self.cancelled:
                    raise RuntimeError("cancelled (the backend was closed)")
                if self.make_aot is not None:
                    step = self._load_aot() or self._build_aot()
                    if step is not None:
                        self.entry = self.aot_entry  # the entry of the step in use
                        self.step = step
                        self.phase = "ready"
                        return step
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

"""Which kernel does each weight product on this machine: chosen by measuring the candidates once, then cached.

The fastest way to multiply by a weight depends on the CPU, not only on the format. On the 2-core AVX-512 machine of
docs/decode.md the fused inductor loop ``int8_gemv`` streams a one-row int8 product faster than
``torch._weight_int8pack_mm``; on an AVX2-only one it is ~8x slower than that packed kernel. And for many rows (a
prefill chunk) the packed int8/int4 kernels are far slower than casting the weight to bf16 and running the bf16 GEMM.
So nothing is assumed: :func:`ensure` measures the candidates for each format on a representative weight of the
model's size class, keeps the fastest, and writes the result into a JSON file the caller names (this package cannot
know fmchat's paths), keyed by torch version, CPU capability (``torch.backends.cpu.get_cpu_capability()``), thread
count and shape class. The next load reads the file; a missing, stale or corrupt entry is measured again.

The choices (module-level, set once at load, before any compile) are read by the layers:

* one row, eager (``one_row(fmt, compiled=False)``): bf16 ``linear`` (``nn.Linear``, the only candidate: the
  module is not ours), int8 ``int8pack``, int4 ``int4pack`` (the only candidates that need no compiler);
* one row inside the compiled decode step (``one_row(fmt, compiled=True)``): bf16 ``fused`` (``fused_float_gemv``)
  or ``linear`` (``F.linear``: inductor's prepacked GEMM); int8 ``fused`` (``int8_gemv``) or ``int8pack`` (the packed
  kernel as an opaque op); int4 ``int4pack`` (opaque op; a fused loop decoding the nibbles was ~20x slower under the
  step's inductor options, which realize the decoded weight into a buffer, so it is not a candidate). Candidates that exist only compiled are measured compiled (with the caller's inductor options);
  in a large model the int8 one is also measured on each of its weight shapes (``one_row(fmt, True, shape)``: the
  fused loop can win at one shape and lose by 2x at another of the same model);
* many rows, eager (``prefill_plan(fmt, rows)``): int8/int4 ``packed`` (the packed kernel), or ``bf16`` / ``fp32``
  (cast a chunk of weight rows to that dtype and use its GEMM; int8 keeps its codes exact and scales the output)
  from ``prefill_min_rows`` rows on, ``chunk_rows`` weight rows at a time (0: all at once); all measured.

Without :func:`ensure` (tests, a bare ``quantize_model``), or with ``FMCHAT_KERNEL_SELECT=off``, the layers run the
defaults (``DEFAULTS``: the kernels used before the selection existed). :func:`current_choices` is the JSON-able
state, for a compiled-artifact cache key (it changes only when a choice does); :func:`describe` is one line for a
report header. The state and its readers live in ``choices.py`` (re-exported here), which imports nothing of the
package: the layers read it without an import circle.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import choices, native
from .choices import (  # the layers' side, re-exported: select is the one module callers need
    _STATE,
    BY_SHAPE,
    DEFAULTS,
    FORMATS,
    NATIVE,
    ONE_ROW,
    PREFILL,
    PREFILL_DTYPES,
    SCHEMA,
    _valid,
    cpu_capability,
    current_choices,
    describe,
    details,
    one_row,
    prefill_chunk,
    prefill_plan,
    reset,
    shape_key,
    use,
)
from .common import HAS_INT4_CPU, HAS_INT8_MM
from .gemv import float_mm_chunks, fused_float_gemv, int8_gemv
from .int4 import Int4Linear
from .int8 import Int8Linear

__all__ = ["DEFAULTS", "FORMATS", "ONE_ROW", "PREFILL", "PREFILL_DTYPES", "SCHEMA", "choices", "cpu_capability",
           "current_choices", "describe", "details", "ensure", "ensure_for_model", "model_formats_and_shapes",
           "one_row", "prefill_chunk", "prefill_plan", "reset", "shape_class", "use"]  # fmt: skip

OFF_ENV = "FMCHAT_KERNEL_SELECT"  # "off": ensure() keeps the defaults (an A/B against the kernels used before)
# JSON for use(), applied after the measured or cached choices, e.g. '{"int8": {"one_row_compiled": "f32"}}': an A/B of
# one candidate against the measured choice (the compiled step's cache key includes the choices)
CHOICES_ENV = "FMCHAT_KERNEL_CHOICES"

# Weight rows dequantized at a time (multiples of int4's 64-row blocks). All rows at once was never faster here (a
# fresh 50 MB temporary per call, page faults and all; the chunk stays in cache): not a candidate, but 0 = all is read.
CHUNK_ROWS = (256, 1024, 4096)
PREFILL_ROWS = (4, 8, 16, 64, 256)  # activation rows at which packed and bf16 are compared (the crossover)
CHUNK_AT_ROWS = 64  # activation rows at which the chunk size is chosen

# The representative weight [N, K] of each shape class (one per format: the measurement stays a few seconds), and
# the N of the weight the prefill is measured on (many rows are compute-bound: the crossover does not depend on N,
# and a quarter of the rows costs a quarter of the time).
SHAPES = {"small": (1536, 576), "large": (8192, 3072)}
PREFILL_N = {"small": 1536, "large": 2048}
SMALL_BYTES = 4 << 20  # a model whose median matrix holds less than this at bf16 is "small" (fits in the caches)


def shape_class(shapes: Iterable[tuple[int, int]] | None) -> str:
    """``small`` when the matrix holding the median weight byte of ``shapes`` (where most of the time goes: Qwen2.5-0.5B's
    small k/v/q/o matrices do not make it small, its MLP does not fit in a cache) holds less than 4 MiB at bf16, else
    ``large``."""
    sizes = sorted(int(n) * int(k) * 2 for n, k in (shapes or ()))
    if not sizes:
        return "large"
    half, acc = sum(sizes) / 2, 0
    for size in sizes:
        acc += size
        if acc >= half:
            return "small" if size < SMALL_BYTES else "large"
    return "large"  # pragma: no cover


def cache_key(cls: str, threads: int | None = None) -> str:
    threads = threads or torch.get_num_threads()
    return f"torch {torch.__version__} | {cpu_capability()} | {threads} threads | {cls}"


# ---------------------------------------------------------------- choosing (measured or cached)
def ensure(
    cache_path: str | os.PathLike | None,
    formats: Iterable[str] = FORMATS,
    *,
    compiled: bool = False,
    shapes: Iterable[tuple[int, int]] | None = None,
    cls: str | None = None,
    compile_options: dict | None = None,
    log: Callable[[str], None] | None = None,
    shapes_by_format: dict[str, list[tuple[int, int]]] | None = None,
) -> dict:
    """Set the module-level choices for ``formats``: from ``cache_path`` (JSON) when it holds an entry for this
    torch, CPU capability, thread count and shape class (``cls``, else derived from ``shapes``, the model's
    [N, K] weights), else measured now (``compiled``: also the candidates of the compiled step, compiled with
    ``compile_options``) and written back. In the classes of ``PER_SHAPE_CLASSES``, the compiled one-row int8
    kernel is also chosen per weight shape of ``shapes_by_format`` that does not fit in the caches (each shape
    measured once, then cached).
    ``cache_path`` None: measure and keep nothing. An unreadable or corrupt file is measured over, never an error; a
    file that cannot be written is only logged. Returns
    :func:`current_choices`. Formats other than bf16/int8/int4 are ignored. The choices are one per format for the
    process (the last call's shape class wins). Call it after setting the thread count and before compiling any
    step: a trace reads the choices, and a trace in another thread during this call could read them half-updated."""
    say = log or (lambda _msg: None)
    if os.environ.get(OFF_ENV, "").lower() in ("off", "0", "default"):
        say(f"kernel selection: off ({OFF_ENV}); default kernels")
        reset()
        _STATE["source"] = f"default ({OFF_ENV}=off)"
        return current_choices()
    if "int8" in formats:  # the native int8 candidates: built once per machine, loaded after (a caller that keeps
        native.load(log=say)  # its files elsewhere loads them first, from its own folder: then this is a no-op)
    cls = cls or shape_class(shapes)
    key = cache_key(cls)
    by_format = shapes_by_format or {}
    formats = [f for f in dict.fromkeys(formats) if f in FORMATS]
    data = _read(cache_path, say)
    entry = data["entries"].setdefault(key, {})
    changed, sources = False, set()
    for fmt in formats:
        rec = entry.get(fmt)
        if not _valid(fmt, rec, compiled):
            t0 = time.perf_counter()
            rec = _measure(fmt, cls, compiled, compile_options, say)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            say(f"kernel selection: {fmt} measured in {rec['seconds']:.1f} s")
            entry[fmt] = rec
            changed = True
            sources.add("measured")
        else:
            sources.add("cached")
        if compiled and cls in PER_SHAPE_CLASSES and BY_SHAPE in DEFAULTS[fmt]:
            # new dicts, never the ones in hand: a record built from DEFAULTS would share (and grow) the default's
            by, by_us = dict(rec.get(BY_SHAPE) or {}), dict(rec.get(BY_SHAPE + "_us") or {})
            todo = [sh for sh in sorted(set(by_format.get(fmt, ()))) if shape_key(sh) not in by and _streamed(sh)]
            for sh in todo:
                t0 = time.perf_counter()
                choice, times = _measure_one_row_shape(fmt, sh, compile_options, say)
                by[shape_key(sh)], by_us[shape_key(sh)] = choice, times
                say(f"kernel selection: {fmt} {shape_key(sh)} one row compiled: {choice} "
                    f"({', '.join(f'{k} {v:.0f} us' for k, v in times.items())}; {time.perf_counter() - t0:.1f} s)")  # fmt: skip
            if todo:
                rec[BY_SHAPE], rec[BY_SHAPE + "_us"] = by, by_us
                changed = True
                sources.add("measured")
        _STATE["choices"][fmt] = copy.deepcopy({k: rec[k] for k in DEFAULTS[fmt] if k in rec} | {
            k: v for k, v in DEFAULTS[fmt].items() if k not in rec})  # fmt: skip
        _STATE["details"][fmt] = {k: v for k, v in rec.items() if k not in DEFAULTS[fmt]}
    if not formats:  # nothing of ours to choose for (e.g. a float32 model): the state is left as it was
        return current_choices()
    _STATE.update(key=key, shape_class=cls, source="measured" if "measured" in sources else "cached")
    _STATE["formats"] = list(dict.fromkeys([*_STATE["formats"], *formats]))
    if changed and cache_path is not None:
        _write(Path(cache_path), data, say)
    _override(formats, say)
    return current_choices()


def _override(formats: list[str], say) -> None:
    """``FMCHAT_KERNEL_CHOICES`` over the formats just chosen (others in it are ignored); ValueError when it is not
    JSON of known formats, keys and candidates."""
    text = os.environ.get(CHOICES_ENV, "").strip()
    if not text:
        return
    try:
        wanted = json.loads(text)
        if not isinstance(wanted, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - one error type for every bad value here
        source = _STATE["source"]
        use({f: c for f, c in wanted.items() if f in formats})
    except ValueError as exc:
        raise ValueError(f"{CHOICES_ENV}: {exc}") from None
    _STATE["source"] = f"{source}, then {CHOICES_ENV}"
    say(f"kernel selection: {CHOICES_ENV} applied: {describe(formats)}")


def model_formats_and_shapes(model: torch.nn.Module) -> tuple[list[str], list[tuple[int, int]]]:
    """The formats of ``model``'s weight products (``int8``/``int4`` quantized layers; ``bf16`` for bf16/fp16
    ``nn.Linear``s, e.g. an output head kept unquantized) and their [N, K] shapes."""
    return _formats_and_shapes(model)[:2]


def _formats_and_shapes(model: torch.nn.Module):
    """(formats, every [N, K], {format: the [N, K] of its weight products}): an embedding's store counts in the last
    only when it is also the output head (otherwise it is read by rows, never multiplied)."""
    from .embedding import QuantizedEmbedding

    rows_only = {id(m.store) for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows_only.discard(id(head))
    formats, shapes, by_format = [], [], {}
    for m in model.modules():
        fmt = None
        if getattr(m, "scheme", None) in ("int8", "int4") and hasattr(m, "out_features"):
            fmt = m.scheme
        elif isinstance(m, torch.nn.Linear) and m.weight.dtype in (torch.bfloat16, torch.float16):
            fmt = "bf16"
        if fmt is not None:
            formats.append(fmt)
            shapes.append((int(m.out_features), int(m.in_features)))
            if id(m) not in rows_only:
                by_format.setdefault(fmt, []).append(shapes[-1])
    return list(dict.fromkeys(formats)), shapes, by_format


def ensure_for_model(model: torch.nn.Module, cache_path, *, compiled: bool = False, compile_options: dict | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """:func:`ensure` for the formats, the shape class and the weight shapes of ``model``'s weights (call after
    quantizing it, before compiling its decode step)."""
    formats, shapes, by_format = _formats_and_shapes(model)
    return ensure(cache_path, formats, compiled=compiled, shapes=shapes, compile_options=compile_options, log=log,
                  shapes_by_format=by_format)  # fmt: skip


def _read(path, say) -> dict:
    empty = {"schema": SCHEMA, "entries": {}}
    if path is None:
        return empty
    p = Path(path)
    if not p.exists():
        return empty
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
            raise ValueError("not a kernel-selection file of this version")
        data["entries"] = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
        return data
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        say(f"kernel selection: {p} unreadable ({type(exc).__name__}), measuring again")
        return empty


def _write(path: Path, data: dict, say) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        say(f"kernel selection: could not write {path} ({exc}); the choice holds for this process only")


# ---------------------------------------------------------------- measuring
def _best_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """The fastest of ``reps`` calls of each function, in seconds, interleaved (a burst of load hits every candidate
    alike). The minimum, not the median: other processes only ever add time, and on a shared 2-core machine with two
    threads most calls of a parallel op can include a wait for a core (~16 ms) that says nothing of the kernel."""
    for f in fns.values():
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in samples.items()}


# A candidate replaces the default only when it is clearly faster: a timing that noise tipped the other way must not
# change a choice that the defaults' own measurements (docs/decode.md) made on purpose.
MARGIN = 0.9


def _pick(times: dict[str, float], default: str) -> str:
    """The fastest of ``times``, unless it beats ``default`` by less than ``MARGIN`` (then ``default``)."""
    best = min(times, key=times.get)
    if default in times and best != default and times[best] > MARGIN * times[default]:
        return default
    return best


def _us(t: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e6, 1) for k, v in t.items()}


_PROBES = itertools.count(1)


class _Probe(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, fn: Callable):
        super().__init__()
        self.layer = layer
        self.fn = fn

    def forward(self, x):
        return self.fn(self.layer, x)


def _compiled(layer: torch.nn.Module, fn: Callable, options: dict | None):
    """``fn(layer, x)`` compiled as the decode step compiles (fullgraph, the layer's tensors frozen in under the
    step's options). Each probe gets a code object of its own: Dynamo's recompile limit is per code object."""
    code = _Probe.forward.__code__.replace(co_name=f"_probe_{next(_PROBES)}")
    cls = type(code.co_name, (_Probe,), {"forward": types.FunctionType(code, _Probe.forward.__globals__, code.co_name)})
    probe = cls(layer, fn).eval()
    return torch.compile(probe, backend="inductor", fullgraph=True, dynamic=False, options=dict(options or {"freezing": True}))


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


@torch.inference_mode()
def _measure(fmt: str, cls: str, compiled: bool, options: dict | None, say) -> dict:
    n, k = SHAPES[cls]
    w = _weight(n, k)
    x1 = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rec: dict = {**copy.deepcopy(DEFAULTS[fmt]), "shape": [n, k], "threads": torch.get_num_threads(),
                 "compiled_measured": compiled}  # fmt: skip
    wb = w.to(torch.bfloat16)
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    lin.weight.data = wb
    bf16_eager = lambda: F.linear(x1, wb)

    if fmt == "bf16":
        rec["one_row_eager_us"] = _us(_best_times({"linear": bf16_eager}, 15))
        wp = wb[: PREFILL_N[cls]]
        rec.update(_measure_prefill(lambda x, c, d: float_mm_chunks(x, wp, None, c, d), lambda x: F.linear(x, wp),
                                    PREFILL_N[cls], wp, k, dtypes={"fp32": torch.float32}, base_name="linear"))  # fmt: skip
        if compiled:
            c = {name: _compiled(lin, f, options) for name, f in
                 (("fused", lambda m, x: fused_float_gemv(x, m.weight)), ("linear", lambda m, x: F.linear(x, m.weight)))}  # fmt: skip
            t = _best_times({name: (lambda f=f: f(x1)) for name, f in c.items()}, 15)
            rec["one_row_compiled_us"] = _us(t)
            rec["one_row_compiled"] = _pick(t, DEFAULTS["bf16"]["one_row_compiled"])
        return rec

    if fmt == "int8":
        if not HAS_INT8_MM:
            return rec
        layer = Int8Linear.from_weight(w, compute_dtype=torch.bfloat16)
        # One row streams its weights from memory in a decode step: the candidates are timed over distinct copies of
        # the weight that together outgrow the caches (one weight, hot in the cache, rewarded compute over streaming).
        ws = _stream_copies(layer.weight_int8)
        wscales = [layer.scales] * len(ws)
        wbs = [wb] + [wb.clone() for _ in ws[1:]]
        fns = {"int8pack": lambda x, w, sc: torch._weight_int8pack_mm(x, w, sc.to(x.dtype))}
        fns.update({k: (lambda x, w, sc, k=k: native.one_row(k, x, w, sc)) for k in (NATIVE if native.available() else ())})
        eager = {k: _over(f, x1, ws, wscales) for k, f in fns.items()}
        eager["bf16 linear"] = _over(lambda x, w, sc: F.linear(x, w), x1, wbs, wscales)
        compiled_candidates = True
        small = Int8Linear.from_weight(w[: PREFILL_N[cls]], compute_dtype=torch.bfloat16)
        ss = small.scales.to(torch.bfloat16)
        small_packed = lambda x: torch._weight_int8pack_mm(x, small.weight_int8, ss)
    else:
        if not HAS_INT4_CPU:
            return rec
        layer = Int4Linear.from_weight(w, compute_dtype=torch.bfloat16)
        sz = layer.scales_zeros.to(torch.bfloat16)
        packed = lambda x: torch._weight_int4pack_mm_for_cpu(x, layer.weight_int4, layer.group_size, sz)
        eager = {"int4pack": lambda: packed(x1), "bf16 linear": bf16_eager}
        compiled_candidates = False  # a fused int4 loop was measured ~20x slower (docs/quant.md): not a candidate
        small = Int4Linear.from_weight(w[: PREFILL_N[cls]], compute_dtype=torch.bfloat16)
        ssz = small.scales_zeros.to(torch.bfloat16)
        small_packed = lambda x: torch._weight_int4pack_mm_for_cpu(x, small.weight_int4, small.group_size, ssz)
    del w
    if fmt == "int8":
        t = {k: v / len(ws) for k, v in _best_times(eager, 5).items()}
        rec["one_row_stream_copies"] = len(ws)
    else:
        t = _best_times(eager, 15)
    rec["one_row_eager_us"] = _us(t)
    rec["one_row_eager"] = _pick({k: v for k, v in t.items() if k in ONE_ROW[(fmt, False)]}, DEFAULTS[fmt]["one_row_eager"])
    best = {"eager": t[rec["one_row_eager"]]}
    if compiled and compiled_candidates:
        t0 = time.perf_counter()
        # Every candidate compiled, called the same way: timed eagerly, the packed kernel skipped the compiled probe's
        # per-call overhead (Dynamo's guards, ~0.1 ms) that the fused loop paid, and won by that alone (43 vs 167 us
        # on a 1536x576 weight, AVX512), while inside the whole step it was the slower choice (int8 decode 0.74x bf16).
        tc = _compiled_stream_times(ws, wscales, x1, options)
        say(f"kernel selection: {fmt} compiled one-row candidates measured in {time.perf_counter() - t0:.1f} s")
        rec["one_row_compiled_us"] = _us(tc)
        rec["one_row_compiled"] = _pick(tc, DEFAULTS[fmt]["one_row_compiled"])
        best["compiled"] = min(tc.values())
    # int8/int4 must never be slower than bf16: the comparison, on the same shape, kept in the record.
    rec["one_row_vs_bf16"] = {m: round(v / t["bf16 linear"], 3) for m, v in best.items()}
    rec["prefill_shape"] = [PREFILL_N[cls], k]
    rec.update(_measure_prefill(small.mm_float_chunks, small_packed, PREFILL_N[cls], wb[: PREFILL_N[cls]], k))
    return rec


# Shape classes whose compiled int8 one-row kernel is chosen per weight shape. Measured on the Phi-3.5 shape (AVX512,
# 2 threads, docs/quant.md): the fused loop streams the K=3072 weights faster than the packed kernel (qkv 1.31 vs
# 1.47 ms, gate_up 2.36 vs 2.72) but the K=8192 down projection at half the speed (2.39 vs 1.07 ms), so one choice per
# format cost ~40 ms a token either way. Small models keep one choice per format: their weights sit in the caches,
# and each shape measured costs two compiles at the first launch.
PER_SHAPE_CLASSES = ("large",)


def _streamed(shape: tuple[int, int]) -> bool:
    """A weight too large for the caches (``SMALL_BYTES`` at bf16): one whose kernel is chosen on its own shape. The
    smaller ones follow the format's choice (a test model's 64x64 matrices, in the large class only because of its
    49k-row embedding, would each cost two compiles)."""
    return int(shape[0]) * int(shape[1]) * 2 >= SMALL_BYTES


@torch.inference_mode()
def _measure_one_row_shape(fmt: str, shape: tuple[int, int], options: dict | None, say) -> tuple[str, dict]:
    """The compiled one-row candidates of ``fmt`` (int8) on a weight of ``shape``, as ``_measure`` times them."""
    n, k = shape
    layer = Int8Linear.from_weight(_weight(n, k), compute_dtype=torch.bfloat16)
    x1 = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ws = _stream_copies(layer.weight_int8)
    t = _compiled_stream_times(ws, [layer.scales] * len(ws), x1, options)
    return _pick(t, DEFAULTS[fmt]["one_row_compiled"]), _us(t)


# Distinct copies of a probe weight, together at least this large (more than a CPU's last-level cache; at most 128
# copies): a one-row product in a decode step reads its weight from memory, not from a cache.
STREAM_BYTES = 96 << 20


def _stream_copies(w: torch.Tensor) -> list[torch.Tensor]:
    n = max(1, min(128, -(-STREAM_BYTES // max(1, w.numel() * w.element_size()))))
    return [w] + [w.clone() for _ in range(n - 1)]


def _over(f: Callable, x, ws, ss) -> Callable[[], object]:
    return lambda: [f(x, w, s) for w, s in zip(ws, ss)]


class _StreamProbe(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x, w, s):
        return self.fn(x, w, s)


def _int8_one_row_candidates() -> dict[str, Callable]:
    """The compiled one-row int8 candidates as ``f(x, w, scales)``, as the layer calls them inside the step."""
    fns = {"fused": int8_gemv,
           "int8pack": lambda x, w, s: torch.ops.kernels_quant.int8pack_mm(x, w, s.to(x.dtype))}  # fmt: skip
    if native.available():
        fns.update({k: (lambda x, w, s, k=k: native.one_row(k, x, w, s)) for k in NATIVE})
    return fns


def _compiled_stream_times(ws, ss, x1, options) -> dict[str, float]:
    """Seconds per product of each compiled candidate, over the distinct weights ``ws`` (inputs of one compiled
    function per candidate, so one compile serves every copy)."""
    calls = {}
    for name, fn in _int8_one_row_candidates().items():
        code = _StreamProbe.forward.__code__.replace(co_name=f"_probe_{next(_PROBES)}")
        cls = type(code.co_name, (_StreamProbe,),
                   {"forward": types.FunctionType(code, _StreamProbe.forward.__globals__, code.co_name)})  # fmt: skip
        probe = torch.compile(cls(fn).eval(), backend="inductor", fullgraph=True, dynamic=False,
                              options={k: v for k, v in (options or {}).items() if k != "freezing"})  # fmt: skip
        probe(x1, ws[0], ss[0])
        calls[name] = _over(probe, x1, ws, ss)
    return {k: v / len(ws) for k, v in _best_times(calls, 5).items()}


def _float_wins(t: dict[str, float], m: int) -> bool:
    return _pick({"packed": t[f"packed@{m}"], "float": t[f"float@{m}"]}, "packed") == "float"


def _inconsistent(t: dict[str, float]) -> bool:
    """The float GEMM's advantage grows with the rows: winning at some row count and losing at a larger one is noise."""
    wins = [_float_wins(t, m) for m in sorted(PREFILL_ROWS)]
    return any(w and not later for i, w in enumerate(wins) for later in wins[i + 1 :])


def _measure_prefill(float_path: Callable, base: Callable, n: int, wb: torch.Tensor, k: int,
                     dtypes: dict[str, torch.dtype] = PREFILL_DTYPES, base_name: str = "packed") -> dict:  # fmt: skip
    """Many rows: the chunk size of the float path ``float_path(x, chunk_rows, dtype)`` (at ``CHUNK_AT_ROWS`` rows), its
    dtype (of ``dtypes``, at the most rows: a CPU without bf16 GEMMs, e.g. AVX2, runs them far slower than fp32),
    then ``base(x)`` (the packed kernel; the bf16 GEMM for bf16 weights) vs that path at each of ``PREFILL_ROWS``:
    the float path from the smallest row count at which it wins there and at every larger one (re-measured once
    when noise makes that inconsistent). ``n``: the weight's rows."""
    g = torch.Generator().manual_seed(2)
    xs = {m: torch.randn(m, k, generator=g).to(torch.bfloat16) for m in PREFILL_ROWS}
    chunks = [c for c in CHUNK_ROWS if c < n] or [0]
    x = xs[CHUNK_AT_ROWS]
    first = next(iter(dtypes.values()))
    tc = _best_times({str(c): (lambda c=c: float_path(x, c, first)) for c in chunks}, 3)
    chunk = int(min(tc, key=tc.get))
    top = xs[max(PREFILL_ROWS)]
    td = _best_times({name: (lambda d=d: float_path(top, chunk, d)) for name, d in dtypes.items()}, 3)
    fname = _pick(td, next(iter(dtypes)))
    dtype = dtypes[fname]
    fns = {}
    for m, xm in xs.items():
        fns[f"packed@{m}"] = lambda xm=xm: base(xm)
        fns[f"float@{m}"] = lambda xm=xm: float_path(xm, chunk, dtype)
    fns[f"bf16 linear@{CHUNK_AT_ROWS}"] = lambda: F.linear(x, wb)
    t = _best_times(fns, 3)
    if _inconsistent(t):  # a burst of load: measure again, keep the best of both
        again = _best_times(fns, 5)
        t = {name: min(v, again[name]) for name, v in t.items()}
    min_rows = None
    for m in sorted(PREFILL_ROWS, reverse=True):
        if _float_wins(t, m):
            min_rows = m
        else:
            break
    best = min(t[f"packed@{CHUNK_AT_ROWS}"], t[f"float@{CHUNK_AT_ROWS}"])
    return {
        "prefill": fname if min_rows is not None else base_name,
        "prefill_min_rows": min_rows,
        "chunk_rows": chunk if min_rows is not None else None,
        "chunk_us": _us(tc),
        "prefill_dtype_us": _us(td),
        "prefill_us": _us(t),
        "prefill_vs_bf16": round(best / t[f"bf16 linear@{CHUNK_AT_ROWS}"], 3),
    }

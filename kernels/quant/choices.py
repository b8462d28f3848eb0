"""The weight-kernel choices the quantized layers read (``one_row``, ``prefill_plan``): module-level state, the
defaults, and its JSON form. ``select.py`` measures and caches them; this module imports nothing of the package, so
the layers can read it without an import circle."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from . import native  # imports nothing of the package either

# 2: the compiled int8 candidates are both timed compiled (1 timed int8pack eagerly: biased); 3: bf16 prefill measured;
# 4: the native int8 kernels (q8, f32) are candidates
SCHEMA = 4
FORMATS = ("bf16", "int8", "int4")

# Candidates per (format, compiled). The first of each is the default.
ONE_ROW = {
    ("bf16", False): ("linear",),
    ("bf16", True): ("fused", "linear"),
    ("int8", False): ("int8pack", "q8", "f32"),
    ("int8", True): ("fused", "int8pack", "q8", "f32"),
    ("int4", False): ("int4pack",),
    ("int4", True): ("int4pack",),
}
# int8 candidates of native.py's library (built at first use; offered only where it loaded): "q8" int8 activations in
# blocks of 32 and integer dot products (llama.cpp's method; AVX-512 VNNI or AVX2), "f32" fp32 activations.
NATIVE = ("q8", "f32")
PREFILL = ("packed", "bf16", "fp32")
PREFILL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# bf16 weights, many rows: the bf16 GEMM ("linear"), or the weights cast to fp32 a chunk of rows at a time and the
# fp32 GEMM ("fp32"): on a CPU without bf16 GEMM instructions (AVX2) the bf16 one runs ~4x slower than that.
PREFILL_BF16 = ("linear", "fp32")
DEFAULTS = {
    "bf16": {"one_row_eager": "linear", "one_row_compiled": "fused", "prefill": "linear", "prefill_min_rows": None,
             "chunk_rows": None},
    "int8": {"one_row_eager": "int8pack", "one_row_compiled": "fused", "prefill": "packed", "prefill_min_rows": None,
             "chunk_rows": None, "one_row_compiled_by_shape": {}},
    "int4": {"one_row_eager": "int4pack", "one_row_compiled": "int4pack", "prefill": "packed",
             "prefill_min_rows": None, "chunk_rows": None},
}  # fmt: skip

_STATE: dict = {}


def reset() -> None:
    """Back to the defaults (as before any :func:`ensure`)."""
    _STATE.clear()
    _STATE.update(source="default", key=None, shape_class=None, choices=copy.deepcopy(DEFAULTS), details={}, formats=[])


reset()


def use(choices: dict) -> None:
    """Set choices by hand (tests, an override): ``{"int8": {"prefill": "bf16", "prefill_min_rows": 2, ...}}``; keys
    not given keep their value. ValueError for an unknown format, key or candidate."""
    for fmt, c in choices.items():
        if fmt not in FORMATS or not set(c) <= set(DEFAULTS[fmt]):
            raise ValueError(f"kernel selection: unknown format or key in {fmt}: {c}")
        merged = {**_STATE["choices"][fmt], **c}
        if not _valid(fmt, merged, compiled=False):
            raise ValueError(f"kernel selection: not a candidate: {fmt}: {c}")
        _STATE["choices"][fmt] = merged
        _STATE["formats"] = list(dict.fromkeys([*_STATE["formats"], fmt]))
    _STATE["source"] = "set"


# ---------------------------------------------------------------- what the layers read
BY_SHAPE = "one_row_compiled_by_shape"  # int8, large models: {"NxK": candidate}, measured per weight shape


def shape_key(shape: tuple[int, int]) -> str:
    return f"{int(shape[0])}x{int(shape[1])}"


def one_row(fmt: str, compiled: bool, shape: tuple[int, int] | None = None) -> str:
    """The kernel for a one-row product of a ``fmt`` weight (eager or inside the compiled step); ``shape`` ``(N, K)``:
    that weight's own measured choice inside the compiled step, where there is one."""
    c = _STATE["choices"][fmt]
    if compiled and shape is not None:
        own = c.get(BY_SHAPE, {}).get(shape_key(shape))
        if own is not None:
            return own
    return c["one_row_compiled" if compiled else "one_row_eager"]


def prefill_plan(fmt: str, rows: int) -> tuple[int, torch.dtype] | None:
    """For ``rows`` activation rows of an int8/int4 weight: None = the packed kernel, else ``(chunk_rows, dtype)``:
    dequantize this many weight rows at a time (0 = all) to ``dtype`` and use that float GEMM. For a bf16 weight:
    None = the bf16 GEMM, else cast that many rows at a time to ``dtype`` (fp32)."""
    c = _STATE["choices"][fmt]
    if c.get("prefill") not in PREFILL_DTYPES or c.get("prefill_min_rows") is None or rows < c["prefill_min_rows"]:
        return None
    return int(c.get("chunk_rows") or 0), PREFILL_DTYPES[c["prefill"]]


def prefill_chunk(fmt: str, rows: int) -> int | None:
    """``prefill_plan``'s chunk rows (None: the packed kernel)."""
    plan = prefill_plan(fmt, rows)
    return None if plan is None else plan[0]


def current_choices() -> dict:
    """What was chosen, as plain JSON values: the key's parts and, per format, the choices (no timings, no source):
    two loads that chose the same kernels give equal dicts."""
    return {
        "schema": SCHEMA,
        "torch": torch.__version__,
        "cpu_capability": cpu_capability(),
        "shape_class": _STATE["shape_class"],
        "key": _STATE["key"],
        **copy.deepcopy(_STATE["choices"]),
    }


def details() -> dict:
    """``current_choices()`` plus where it came from (``default``, ``measured``, ``cached``) and, per format, the
    measured medians (microseconds) and the comparisons with bf16."""
    return {**current_choices(), "source": _STATE["source"], "measured": copy.deepcopy(_STATE["details"])}


def describe(formats: Iterable[str] | None = None) -> str:
    """One line: the chosen kernels of ``formats`` (default: those :func:`ensure` or :func:`use` set, else all), and
    whether they were measured, read from the cache, set or defaults."""
    formats = formats or _STATE["formats"] or FORMATS
    parts = []
    for fmt in formats:
        c = _STATE["choices"].get(fmt)
        if c is None:
            continue
        s = f"{fmt}: 1 row {c['one_row_eager']} (eager) / {c['one_row_compiled']} (compiled)"
        own = {k: v for k, v in c.get(BY_SHAPE, {}).items() if v != c["one_row_compiled"]}
        if own:
            s += " but " + ", ".join(f"{v} for {k}" for k, v in sorted(own.items()))
        pc = c.get("prefill_min_rows")
        if c.get("prefill") in PREFILL_DTYPES and pc is not None:
            chunk = c.get("chunk_rows") or "all"
            s += f", prefill {c['prefill']} GEMM from {pc} rows (weight rows {chunk} at a time)"
        else:
            s += ", prefill bf16 linear" if fmt == "bf16" else ", prefill packed"
        if {c["one_row_eager"], c["one_row_compiled"], *c.get(BY_SHAPE, {}).values()} & set(NATIVE):
            s += f" [{native.describe()}]"
        parts.append(s)
    where = _STATE["source"] + (f" [{_STATE['shape_class']}]" if _STATE["shape_class"] else "")
    return f"{'; '.join(parts)} ({where})"


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _valid(fmt: str, rec, compiled: bool) -> bool:
    if not isinstance(rec, dict):
        return False
    used = {rec.get("one_row_eager"), rec.get("one_row_compiled"), *(rec.get(BY_SHAPE) or {}).values()}
    if used & set(NATIVE) and not native.available():  # chosen where the library loaded; here it did not
        return False
    if rec.get("one_row_eager") not in ONE_ROW[(fmt, False)]:
        return False
    if rec.get("one_row_compiled") not in ONE_ROW[(fmt, True)]:
        return False
    if compiled and not rec.get("compiled_measured"):
        return False
    by = rec.get(BY_SHAPE, {})
    if not isinstance(by, dict) or any(v not in ONE_ROW[(fmt, True)] for v in by.values()):
        return False
    chunk = rec.get("chunk_rows")
    if rec.get("prefill") not in (PREFILL_BF16 if fmt == "bf16" else PREFILL):
        return False
    if not (chunk is None or (type(chunk) is int and chunk >= 0 and chunk % 64 == 0)):
        return False  # int4 dequantizes whole 64-row blocks of its packed layout
    return rec.get("prefill_min_rows") is None or isinstance(rec.get("prefill_min_rows"), int)

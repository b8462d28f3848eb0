"""The registry of choices the settings pane and the CLI offer.

Each choice says whether it can be used on this machine now, and if not, why. Choices whose
implementation lands later are listed (disabled, with the reason) rather than silently ignored.
Availability is read from the engine where it can be, so a choice turns on when its code lands.
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_YET = "not implemented yet"


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    available: bool = True
    reason: str = ""  # why it is disabled (empty when available)

    def describe(self) -> str:
        return self.label if self.available else f"{self.label} ({self.reason})"


def _registered_backends() -> set[str]:
    from fmchat import backends

    return set(backends.BACKENDS)


def _registered_kernels() -> set[str]:
    try:
        from fmchat.backends.transformers_backend import KERNELS
    except Exception:  # pragma: no cover - the backend always imports in a full install
        return {"sdpa", "eager"}
    return set(KERNELS)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _backend_reason(name: str, registered: set[str]) -> str:
    """Why a backend cannot be picked here ('' when it can)."""
    import importlib.util

    if name not in registered:
        return NOT_YET
    if name == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        return "needs llama-cpp-python (pip install llama-cpp-python)"
    return ""


def backends() -> list[Choice]:
    have = _registered_backends()
    known = [
        ("transformers", "transformers (PyTorch)"),
        ("llamacpp", "llama.cpp"),
        ("openai", "OpenAI-compatible server"),
    ]
    out = []
    for v, label in known:
        reason = _backend_reason(v, have)
        out.append(Choice(v, label, not reason, reason))
    return out


def _quant_schemes() -> set[str] | None:
    """The weight quantizations the backend loads (None: this engine has no quant load option)."""
    try:
        from fmchat.backends.transformers_backend import QUANT_SCHEMES
    except ImportError:
        return None
    return set(QUANT_SCHEMES)


def quantizations() -> list[Choice]:
    have = _quant_schemes()
    known = [
        ("none", "none (the model's weights at the chosen dtype)"),
        ("bf16", "bf16 (bfloat16 weights)"),
        ("fp16", "fp16 (float16 weights)"),
        ("int8", "int8 (per-channel, weight-only)"),
        ("int4", "int4 (groups of 32, weight-only)"),
        ("log8", "log8 (8-bit logarithmic, weight-only)"),
    ]
    if have is None:  # older engine: bf16/fp16 are dtypes, the integer schemes are not there yet
        have = {"none", "bf16", "fp16"}
    return [Choice(v, label, v in have, "" if v in have else NOT_YET) for v, label in known]


# On an engine without a quant load option, bf16/fp16 are loaded as plain dtypes.
QUANT_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def engine_has_quant() -> bool:
    from dataclasses import fields

    from fmchat.backends import LoadOptions

    return any(f.name == "quant" for f in fields(LoadOptions))


def engine_has_memory_policies() -> bool:
    from dataclasses import fields

    from fmchat.engine import SessionConfig

    return any(f.name == "memory" for f in fields(SessionConfig))


def kernels() -> list[Choice]:
    have = _registered_kernels()
    known = [
        ("sdpa", "sdpa (PyTorch scaled_dot_product_attention)"),
        ("eager", "eager (reference attention)"),
        ("fmc", "fmc (fmchat's attention over a preallocated KV cache)"),
    ]
    return [Choice(v, label, v in have, "" if v in have else NOT_YET) for v, label in known]


def memory_policies() -> list[Choice]:
    try:
        from fmchat.memory.policies import POLICIES

        have = set(POLICIES) if engine_has_memory_policies() else {"none"}
    except ImportError:
        have = {"none"}
    known = [
        ("none", "none (stop with a clear message when the context is full)"),
        ("sliding", "sliding window (drop the oldest turns, rebuild the cache)"),
        ("shift", "context shift (drop the oldest turns, re-rotate the cached keys)"),
        ("summary", "summarize the oldest turns into a note"),
    ]
    return [Choice(v, label, v in have, "" if v in have else NOT_YET) for v, label in known]


def devices() -> list[Choice]:
    cuda = _cuda()
    return [
        Choice("auto", "auto (cuda if present, else cpu)"),
        Choice("cpu", "cpu"),
        Choice("cuda", "cuda", cuda, "" if cuda else "no CUDA device on this machine"),
    ]


def dtypes() -> list[Choice]:
    return [
        Choice("auto", "auto (bfloat16, float16 on GPUs without bf16)"),
        Choice("float32", "float32"),
        Choice("bfloat16", "bfloat16"),
        Choice("float16", "float16"),
    ]


REGISTRY = {
    "backend": backends,
    "quant": quantizations,
    "kernel": kernels,
    "memory_policy": memory_policies,
    "device": devices,
    "dtype": dtypes,
}


def choices(kind: str) -> list[Choice]:
    return REGISTRY[kind]()


def check(kind: str, value: str) -> str | None:
    """None if ``value`` is an available ``kind`` choice, else a one-line reason."""
    opts = choices(kind)
    for c in opts:
        if c.value == value:
            return None if c.available else f"{kind.replace('_', ' ')} '{value}' is {c.reason}"
    names = ", ".join(c.value for c in opts)
    return f"unknown {kind.replace('_', ' ')} '{value}' (choices: {names})"

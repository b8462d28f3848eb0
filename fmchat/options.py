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
    if name == "openai":
        return "needs a server URL; use 'fmchat run --backend openai' (not in the app yet)"
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


def quantizations() -> list[Choice]:
    return [
        Choice("none", "none (the model's weights at --dtype)"),
        Choice("bf16", "bf16 (bfloat16 weights)"),
        Choice("fp16", "fp16 (float16 weights)"),
        Choice("int8", "int8", False, NOT_YET),
        Choice("int4", "int4", False, NOT_YET),
        Choice("log8", "log8", False, NOT_YET),
    ]


# quantizations that are plain dtypes for the transformers backend
QUANT_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def kernels() -> list[Choice]:
    have = _registered_kernels()
    known = [
        ("sdpa", "sdpa (PyTorch scaled_dot_product_attention)"),
        ("eager", "eager (reference attention)"),
        ("fmc", "fmc (fmchat's attention over a preallocated KV cache)"),
    ]
    return [Choice(v, label, v in have, "" if v in have else NOT_YET) for v, label in known]


def memory_policies() -> list[Choice]:
    return [
        Choice("none", "none (stop with a clear message when the context is full)"),
        Choice("sliding", "sliding window", False, NOT_YET),
        Choice("shift", "context shift", False, NOT_YET),
        Choice("summary", "summarize old turns", False, NOT_YET),
    ]


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

"""Backends behind one factory. Each registers here (name, label, availability, capabilities) and is
imported only when a chat loads it. ``load(config)`` is the one way to get a backend; chats are built by
``fmchat.conversation``, which calls it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from fmchat import models, registry

from .base import (
    AllLogits,
    Backend,
    KVShift,
    KVSnapshot,
    LoadReport,
    ProgressFn,
    StreamPiece,
    TextBackend,
    TokenBackend,
    default_threads,
    no_progress,
)

if TYPE_CHECKING:
    from fmchat.config import RunConfig


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _llamacpp_missing() -> str:
    return "" if importlib.util.find_spec("llama_cpp") is not None else "needs llama-cpp-python (pip install llama-cpp-python)"


registry.BACKENDS.add(
    "transformers",
    "transformers (PyTorch; full KV-cache and memory introspection)",
    capabilities={"token-level", "kv-shift", "kv-snapshot", "compiled-step", "quant", "kernels"},
    target="fmchat.backends.transformers.backend:TransformersBackend",
)
registry.BACKENDS.add(
    "llamacpp",
    "llama.cpp (llama-cpp-python; fastest on a CPU; needs a .gguf model)",
    unavailable=_llamacpp_missing,
    capabilities={"token-level", "kv-shift"},
    target="fmchat.backends.llamacpp:LlamaCppBackend",
)
registry.BACKENDS.add(
    "openai",
    "OpenAI-compatible server (needs a server URL; key from FMCHAT_API_KEY / OPENAI_API_KEY)",
    capabilities={"text-level"},
    target="fmchat.backends.openai:OpenAIBackend",
)
registry.DEVICES.add("auto", "auto (cuda if present, else cpu)")
registry.DEVICES.add("cpu", "cpu")
registry.DEVICES.add("cuda", "cuda", unavailable=lambda: "" if _cuda() else "no CUDA device on this machine")
registry.DTYPES.add("auto", "auto (bfloat16, float16 on GPUs without bf16)")
registry.DTYPES.add("float32", "float32")
registry.DTYPES.add("bfloat16", "bfloat16")
registry.DTYPES.add("float16", "float16")


def load(config: RunConfig, progress: ProgressFn = no_progress) -> Backend:
    """Load ``config.model`` on ``config.backend``. Raises FmchatError subclasses for what the user can fix."""
    entry = registry.BACKENDS.entry(config.backend)
    registry.BACKENDS.require(config.backend)
    module, _, attr = entry.target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if "text-level" in entry.capabilities:
        return cls(config, progress)
    progress(f"resolving model {config.model or models.DEFAULT_MODEL}", None)
    return cls(models.resolve(config.model), config, progress)


__all__ = [
    "AllLogits",
    "Backend",
    "KVShift",
    "KVSnapshot",
    "LoadReport",
    "ProgressFn",
    "StreamPiece",
    "TextBackend",
    "TokenBackend",
    "default_threads",
    "load",
    "no_progress",
]

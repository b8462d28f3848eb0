"""The one small protocol every token-level backend implements.

The engine (``fmchat.engine.ChatSession``) owns the conversation and the token ledger; a backend owns
weights, tokenizer and the KV cache, and answers four questions: how a conversation renders to tokens,
what the logits after some tokens are (appending them to its cache), how to crop its cache back to a
prefix, and what it costs (bytes, device). Anything a backend cannot know it reports as ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

ProgressFn = Callable[[str, "float | None"], None]


def default_threads() -> int:
    """CPU threads by default: the physical cores this process may run on (SMT siblings share one core's
    units; they slow decode down). Used for PyTorch and llama.cpp alike."""
    import os

    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


def no_progress(step: str, fraction: float | None = None) -> None:
    pass


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    ctx: int | None = None  # context window cap (tokens); None = the model's own maximum
    kernel: str = "sdpa"  # attention implementation: sdpa | eager
    quant: str = "none"  # weight quantization: none | bf16 | fp16 | int8 | int4 | log8 (kernels/quant)
    threads: int | None = None  # CPU threads (llama.cpp); None = all cores this process may use
    compile: str = "off"  # transformers: torch.compile the one-token decode step: off | on (backends/compiled.py)
    gpu_layers: int = 0  # layers offloaded to the GPU (llama.cpp; -1 = all)
    base_url: str | None = None  # OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1 (openai)
    api_model: str | None = None  # model name on that server; None = the first it lists (openai)


@dataclass(frozen=True)
class LoadReport:
    """How a load went: shown to the user and kept for the README's load-time figures."""

    seconds: float
    converted: bool  # a GGUF was converted to safetensors during this load
    weights_dir: str


@runtime_checkable
class Backend(Protocol):
    name: str  # backend name, e.g. "transformers"
    model_name: str
    device: str
    dtype: str
    ctx_size: int  # context window (tokens)
    eos_token_ids: frozenset[int]
    load_report: LoadReport

    def render(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the chat template applied to ``messages`` with the assistant prompt appended."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens removed."""

    def cached_tokens(self) -> int:
        """Tokens held in the KV cache."""

    def truncate(self, n: int) -> None:
        """Crop the KV cache to its first ``n`` tokens."""

    def forward(self, ids: Sequence[int]):
        """Run ``ids`` after the cached tokens, append them to the cache, return next-token logits (1-D)."""

    def seq_lens(self) -> list[int]:
        """KV-cache fill per batch row (tokens)."""

    def kv_bytes(self) -> int | None: ...

    def weights_bytes(self) -> int | None: ...

    def accelerator_mem_mb(self) -> float | None: ...

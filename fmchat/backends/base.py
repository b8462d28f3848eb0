"""What a backend is: two protocols and the optional capabilities a backend declares by implementing them.

* ``TokenBackend`` — owns a tokenizer and a KV cache (transformers, llama.cpp). The engine keeps the token
  ledger and asks four things: how a conversation renders to tokens, the logits after some tokens (appended
  to the cache), how to crop the cache back to a prefix, and what it costs.
* ``TextBackend`` — a server that owns tokenizer and cache (openai): the engine sends messages and reads a
  stream of text pieces.

Optional capabilities are mixins; a backend has one when it inherits it, and callers ask with
``isinstance`` — never by probing for attributes:

* ``KVShift`` — remove cached positions and re-rotate the later keys (the ``shift`` context policy).
* ``KVSnapshot`` — export/import the cached keys and values (saved sessions resume without re-prefilling).
* ``AllLogits`` — logits at every position of a forward (perplexity in benchmarks).

Whoever owns the cache does the cache surgery: nothing outside a backend touches its cache's tensors.
A figure a backend cannot know is ``None``, never 0.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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
class LoadReport:
    """How a load went: shown to the user and kept for the README's load-time figures."""

    seconds: float
    converted: bool  # a GGUF was converted to safetensors during this load
    weights_dir: str
    kept_codes: bool = False  # quantized weights an earlier load kept, mapped (transformers: quant_store.py)


@dataclass
class StreamPiece:
    """A piece of a text-level backend's reply stream."""

    text: str = ""
    usage: dict | None = None
    finish_reason: str | None = None


class Backend(ABC):
    """What every backend reports. Subclass TokenBackend or TextBackend, never this directly."""

    name: str  # the registry name, e.g. "transformers"
    model_name: str
    device: str
    dtype: str  # as loaded: "bfloat16", a GGUF type such as "Q4_1", or "server"
    quant: str = "none"  # weight quantization as loaded: a kernels/quant scheme, "gguf", "server"
    kernel: str = ""  # attention implementation as loaded
    chat_template: str = "—"  # which chat template renders the chat, and why (fmchat.templates)
    chat_template_own: bool = True  # False: one the model does not carry (a built-in or a file), said once at load
    ctx_size: int | None  # context window (tokens); None when the backend cannot know it
    load_report: LoadReport

    @property
    def decode_path(self) -> str:
        """How one-token steps run, as shown to the user."""
        return self.name

    def seq_lens(self) -> list[int] | None:
        """KV-cache fill per batch row (tokens); None when the backend cannot know it."""
        return None

    def kv_bytes(self) -> int | None:
        """Bytes the KV cache holds (allocated); None when the backend cannot know it."""
        return None

    def kv_used_bytes(self) -> int | None:
        """Bytes of the KV cache that hold cached positions (grows with ``seq_lens``, whatever is allocated)."""
        return None

    def weights_bytes(self) -> int | None:
        return None

    def accelerator_mem_mb(self) -> float | None:
        return None

    def close(self) -> None:
        """Free what the backend holds (a server connection, llama.cpp's context...)."""


class TokenBackend(Backend):
    """Owns tokenizer and KV cache; the engine keeps the ledger of the cached token ids."""

    eos_token_ids: frozenset[int]

    @abstractmethod
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template applied to ``messages`` (with the assistant prompt appended)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens removed."""

    @abstractmethod
    def cached_tokens(self) -> int:
        """Tokens held in the KV cache."""

    @abstractmethod
    def truncate(self, n: int) -> None:
        """Crop the KV cache to its first ``n`` tokens."""

    @abstractmethod
    def forward(self, ids: Sequence[int]):
        """Run ``ids`` after the cached tokens, append them to the cache, return next-token logits (1-D)."""

    def seq_lens(self) -> list[int] | None:
        return [self.cached_tokens()]


class TextBackend(Backend):
    """A server that owns tokenizer and cache: messages go out, text comes back."""

    @abstractmethod
    def stream_chat(self, messages: Sequence[dict], gen, cancel: threading.Event) -> Iterator[StreamPiece]:
        """Stream the reply to ``messages`` with sampling ``gen``; stop early when ``cancel`` is set."""


# ---------------------------------------------------------------- optional capabilities
class KVShift(ABC):
    @abstractmethod
    def shift(self, n_keep: int, n_discard: int) -> str | None:
        """Remove cached positions [n_keep, n_keep + n_discard) and move the later ones back so nothing is
        re-prefilled. None when done; else why it cannot be done exactly (the cache is then unchanged)."""


class KVSnapshot(ABC):
    @abstractmethod
    def kv_fingerprint(self) -> dict:
        """What the cached keys and values depend on besides the tokens (weights, dtype, quant, kernel...)."""

    @abstractmethod
    def kv_layers(self) -> int:
        """How many (keys, values) pairs a snapshot holds."""

    @abstractmethod
    def export_kv(self, start: int, end: int) -> list[tuple]:
        """CPU copies of every layer's (keys, values) for cached positions [start, end): [B, H, end-start, D]."""

    @abstractmethod
    def import_kv(self, layers: list[tuple]) -> None:
        """Append every layer's (keys, values) to the cache (positions after the cached ones). Raises
        ValueError when they do not fit this cache; the caller then empties it."""


class BackgroundDecode(ABC):
    """A decode path prepared after the load, in the background (the transformers backend's compiled step under
    ``--compile auto``): callers ask where it stands, are told when it changes, or wait for it."""

    @abstractmethod
    def decode_status(self) -> dict:
        """``state`` ("eager", "compiling", "ready", "compiled", "failed", "unavailable"), ``phase``, ``elapsed_s``,
        ``fraction``, ``cached_entry`` (a saved step exists for this key), ``detail``..."""

    @abstractmethod
    def watch_decode(self, fn) -> None:
        """Call ``fn()`` (on another thread) whenever the preparation changes phase or finishes."""

    @abstractmethod
    def wait_decode_step(self, timeout: float | None = None, progress: ProgressFn | None = None) -> bool:
        """Block until the preparation has finished; True when the prepared path is ready."""


class AllLogits(ABC):
    @abstractmethod
    def forward_all(self, ids: Sequence[int]):
        """Like forward, but the logits at every position [n, vocab] (perplexity)."""

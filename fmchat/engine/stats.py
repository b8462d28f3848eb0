"""Per-turn statistics: what one turn of the conversation cost.

Every field carries its unit in its name or in the table in README.md.
A field a backend cannot know is ``None`` ("unavailable"), never an invented zero.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field

import psutil

MB = 1024 * 1024


@dataclass
class TurnStats:
    """What one turn cost. See README.md, "Stats fields", for each field."""

    turn: int = 0
    prompt_tokens: int | None = 0  # tokens of the rendered prompt this turn (whole history + new message)
    reused_tokens: int | None = 0  # of those, tokens already in the KV cache (not recomputed)
    prefilled_tokens: int | None = 0  # tokens run through the model before the first new token
    generated_tokens: int | None = 0  # tokens sampled for the reply
    ttft_ms: float | None = None  # turn start -> first reply token sampled; None when no token came
    prefill_tok_s: float | None = None  # prefilled_tokens / prefill time
    decode_tok_s: float | None = None  # (generated_tokens - 1) / time from first to last token
    total_ms: float = 0.0  # whole turn, wall clock
    ctx_used: int | None = 0  # tokens in the KV cache at the end of the turn
    ctx_size: int | None = 0  # context window (tokens)
    seq_lens: list[int] | None = field(default_factory=list)  # KV-cache fill per batch row (tokens)
    kv_bytes: int | None = None  # bytes held by the KV cache (allocated)
    kv_used_bytes: int | None = None  # of those, the bytes holding cached positions
    weights_bytes: int | None = None  # bytes held by model weights
    rss_mb: float = 0.0  # process resident set size (MiB)
    peak_rss_mb: float = 0.0  # peak resident set size of the process so far (MiB)
    gpu_mem_mb: float | None = None  # accelerator memory allocated (MiB); None on CPU
    device: str = ""
    dtype: str = ""
    decode_path: str = ""  # transformers: "eager", "compiled (inductor, 41.0 s)" or "eager: compile failed (why)"
    memory_action: str = ""  # what the memory policy did before this turn: "" | dropped | shifted | summarized
    memory_note: str = ""  # one line saying what was dropped/summarized, or why a policy fell back
    evicted_tokens: int = 0  # tokens of the turns dropped from the window this turn
    summarized_tokens: int = 0  # of those, tokens folded into the memory note
    kv_fill_before: int | None = None  # KV-cache fill before the policy acted (tokens); None if it did not act
    kv_fill_after: int | None = None  # ... and right after (before this turn's prefill)
    stream_chunks: int | None = None  # text-level (HTTP) backends: content chunks received
    stream_chunks_s: float | None = None  # ... and chunks per second after the first (one token each on most servers, not promised)
    finish_reason: str = ""  # "stop" (end of turn token), "length" (max_new_tokens), "context" (window full), "cancelled"
    cancelled: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / MB if sys.platform == "darwin" else peak / 1024


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= MB:
        return f"{n / MB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"

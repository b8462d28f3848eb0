"""Events a turn streams back to whoever drives the session (CLI, TUI, benchmarks).

Data flows one way: caller -> ChatSession -> backend -> model; these events flow back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import TurnStats


@dataclass(frozen=True)
class LoadProgress:
    """A model-load step. ``fraction`` is None when the step has no measurable progress."""

    step: str
    fraction: float | None = None


@dataclass(frozen=True)
class TurnStarted:
    """The prompt is rendered and matched against the KV cache; prefill is about to start. A count the backend
    cannot know (a text-level server owns tokenizer and cache) is None, never 0."""

    turn: int
    prompt_tokens: int | None
    reused_tokens: int | None
    prefill_tokens: int | None
    ctx_size: int | None


@dataclass(frozen=True)
class TextDelta:
    """New reply text. ``generated`` counts reply tokens so far (on a text-level backend: the stream's content
    chunks); ``ctx_used`` is the KV-cache fill (None where the backend cannot know it); ``elapsed_s`` is since the
    first token."""

    text: str
    generated: int
    ctx_used: int | None
    elapsed_s: float


@dataclass(frozen=True)
class TurnDone:
    """The turn is over (finished, hit a limit, or cancelled). ``reply`` is the whole reply text."""

    reply: str
    stats: TurnStats


Event = LoadProgress | TurnStarted | TextDelta | TurnDone


def run_to_done(events) -> TurnDone:
    """Drain a turn's events and return its TurnDone (scripts, benchmarks, tests)."""
    done = None
    for ev in events:
        if isinstance(ev, TurnDone):
            done = ev
    if done is None:
        raise RuntimeError("the turn ended without a TurnDone event")
    return done

"""What happens when the conversation outgrows the context window.

* ``none``    - stop with a clear message; nothing is dropped silently.
* ``sliding`` - drop the oldest whole turns from the window (never the system prompt or the new
                message) until the next turn fits with room for the reply; the rest is re-prefilled.
* ``shift``   - drop the same turns *from the KV cache itself*: keep the first tokens (system prompt,
                the attention sinks), remove the oldest turns' cells and re-rotate the later keys to
                their new positions, so nothing is re-prefilled (llama.cpp: its own context shift).
                Falls back to ``sliding``, and says why, where the RoPE math or the template forbid it.
* ``summary`` - summarize the oldest turns with the loaded model into a memory note kept after the
                system prompt, then drop them. A summary that brings in names or numbers absent from
                the text it summarizes is rejected (then the turns are just dropped).

Dropped turns stay in the transcript (``session.messages``); only the window the model sees moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fmchat.tokens import common_prefix

SUMMARY_MAX_TOKENS = 80
NOTE_MAX_CHARS = 600


@dataclass
class MemoryAction:
    """What a policy decided; the session applies it (it owns the window, the ledger and the backend)."""

    policy: str
    action: str  # "dropped" | "shifted" | "summarized"
    dropped_messages: int
    evicted_tokens: int  # tokens of the dropped turns, as rendered
    summarized_tokens: int = 0  # of those, tokens folded into the memory note
    kv_before: int = 0
    kv_after: int = 0
    note: str = ""  # why a policy fell back, or the summary kept
    new_window_start: int = 0  # messages before this index leave the window
    memory_note: str | None = None  # the new memory note (summary policy); None = unchanged
    shift: tuple[int, int] | None = None  # (keep, discard): KV cells [keep, keep + discard) to remove and re-rotate

    def describe(self) -> str:
        what = {"dropped": "dropped", "shifted": "shifted out of the KV cache", "summarized": "summarized"}[self.action]
        return f"{self.dropped_messages} messages ({self.evicted_tokens} tokens) {what}" + (f"; {self.note}" if self.note else "")

    def shift_failed(self, reason: str) -> None:
        """The backend could not shift: the turns are dropped and the rest re-prefilled (sliding)."""
        self.shift = None
        self.action = "dropped"
        self.note = f"shift not possible ({reason}); fell back to sliding"


class NoRoom(Exception):
    pass


class Window(Protocol):
    """What a policy reads of a chat (ChatSession implements it). Policies never change the chat."""

    ctx_size: int
    window_start: int
    messages: list
    memory_note: str

    @property
    def ledger(self) -> Sequence[int]: ...

    def template_messages(self, extra_user: str | None = None, window_start: int | None = None) -> list[dict]: ...

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...


def _turn_starts(w: Window) -> list[int]:
    """Message indices (from the window start) where each in-window turn begins."""
    return [i for i in range(w.window_start, len(w.messages)) if w.messages[i].role == "user"]


def choose_drop(w: Window, user_text: str, reserve: int) -> int:
    """The new window start: drop the fewest oldest turns so that the next prompt + ``reserve`` fits."""
    ctx = w.ctx_size
    starts = _turn_starts(w)[1:] + [len(w.messages)]
    for start in starts:
        n = len(w.render(w.template_messages(user_text, window_start=start)))
        if n + reserve <= ctx:
            return start
    n = len(w.render(w.template_messages(user_text, window_start=len(w.messages))))
    if n + 1 <= ctx:
        return len(w.messages)  # everything old dropped; less room for the reply than asked
    raise NoRoom(f"the new message alone needs {n} tokens but the context window is {ctx} tokens")


def _render_window(w: Window, start: int) -> list[int]:
    """Tokens of the window from message ``start`` on (no new message, no assistant header)."""
    msgs = w.template_messages(window_start=start)
    return w.render(msgs, add_generation_prompt=False) if msgs else []


def plan_room(w: Window, policy: str, user_text: str, reserve: int, *, kv_cache: bool,
              complete: Callable[[list[int], int], str]) -> MemoryAction:  # fmt: skip
    """Decide how ``policy`` makes room so the next turn fits. Raises NoRoom if even that cannot help.

    ``complete(ids, max_new_tokens)`` generates greedily on the chat's model (the summary policy's note).
    """
    new_start = choose_drop(w, user_text, reserve)
    old_window = _render_window(w, w.window_start)
    new_window = _render_window(w, new_start)
    dropped_tokens = max(len(old_window) - len(new_window), 0)
    dropped = w.messages[w.window_start : new_start]
    action = MemoryAction(policy, "dropped", len(dropped), dropped_tokens, kv_before=len(w.ledger), new_window_start=new_start)

    if policy == "summary":
        note, why = summarize(w, dropped, complete)
        if note is None:
            action.note = f"summary {why}; turns dropped instead"
        else:
            action.memory_note = (w.memory_note + " " + note).strip()[-NOTE_MAX_CHARS:]
            action.action, action.summarized_tokens, action.note = "summarized", dropped_tokens, note
    elif policy == "shift":
        reason = _plan_shift(w, old_window, new_window, dropped_tokens, kv_cache)
        if isinstance(reason, str):
            action.shift_failed(reason)
        else:
            action.action, action.shift = "shifted", reason
    return action


def _plan_shift(w: Window, old_window: list[int], new_window: list[int], dropped_tokens: int, kv_cache: bool):
    """The (keep, discard) cells to remove from the KV cache, or why the shift cannot be exact."""
    if not kv_cache:
        return "the KV cache is off"
    keep = common_prefix(old_window, new_window)  # system prompt and other leading tokens: the attention sinks
    end = keep + dropped_tokens
    # The template must render the kept turns the same with or without the dropped ones,
    # and the cache must hold exactly those tokens where they are to be removed.
    if old_window[end:] != new_window[keep:]:
        return "the chat template re-renders the kept turns"
    if list(w.ledger[:end]) != old_window[:end]:
        return "the cache does not hold the dropped turns as rendered"
    return (keep, dropped_tokens)


# ---------------------------------------------------------------- summary
SUMMARY_SYSTEM = "You write short, factual notes about a conversation. Use only facts stated in it."
_STOP = {"the", "a", "an", "i", "you", "he", "she", "it", "we", "they", "this", "that", "these", "those", "user",
         "assistant", "summary", "in", "on", "at", "and", "but", "then", "also", "their", "his", "her", "my",
         "when", "after", "before", "both", "there", "here", "note", "notes", "conversation"}  # fmt: skip


def unsupported_claims(summary: str, source: str) -> list[str]:
    """Names (capitalized words) and numbers in ``summary`` that do not occur in ``source``."""
    src = source.lower()
    bad = []
    for w in re.findall(r"\b[A-Z][A-Za-z'-]+\b", summary):
        if w.lower() not in _STOP and not re.search(r"\b" + re.escape(w.lower()) + r"\b", src):
            bad.append(w)
    for n in re.findall(r"\d+(?:[.,]\d+)?", summary):
        if n not in source:
            bad.append(n)
    return bad


def summarize(w: Window, dropped, complete: Callable[[list[int], int], str]) -> tuple[str | None, str]:
    """A short note on ``dropped`` messages from the loaded model (greedy) and "", or None and why there is none:
    the window has no room to ask for it, the model wrote nothing, or the note names things the turns did not."""
    source = "\n".join(f"{m.role}: {m.content}" for m in dropped)
    ctx = w.ctx_size
    while True:
        msgs = [{"role": "system", "content": SUMMARY_SYSTEM},
                {"role": "user", "content": f"Summarize this conversation in at most two short sentences.\n\n{source}"}]  # fmt: skip
        ids = w.render(msgs)
        if len(ids) + SUMMARY_MAX_TOKENS <= ctx or len(source) < 64:
            break
        source = source[len(source) // 4 :]  # keep the most recent part of what is being dropped
    if len(ids) + SUMMARY_MAX_TOKENS > ctx:
        return None, (f"skipped (asking for it takes {len(ids)} + {SUMMARY_MAX_TOKENS} tokens, "
                      f"more than the {ctx}-token window)")  # fmt: skip
    text = complete(ids, SUMMARY_MAX_TOKENS).strip()
    if not text:
        return None, "rejected (the model wrote nothing)"
    bad = unsupported_claims(text, source)
    if bad:
        shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        return None, f"rejected (it names {shown}, not in the dropped turns)"
    return text, ""

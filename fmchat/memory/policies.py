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
from dataclasses import dataclass

POLICIES = ("none", "sliding", "shift", "summary")
SUMMARY_MAX_TOKENS = 80
NOTE_MAX_CHARS = 600


@dataclass
class MemoryAction:
    policy: str
    action: str  # "dropped" | "shifted" | "summarized"
    dropped_messages: int
    evicted_tokens: int  # tokens of the dropped turns, as rendered
    summarized_tokens: int = 0  # of those, tokens folded into the memory note
    kv_before: int = 0
    kv_after: int = 0
    note: str = ""  # why a policy fell back, or the summary kept

    def describe(self) -> str:
        what = {"dropped": "dropped", "shifted": "shifted out of the KV cache", "summarized": "summarized"}[self.action]
        return f"{self.dropped_messages} messages ({self.evicted_tokens} tokens) {what}" + (f"; {self.note}" if self.note else "")


class NoRoom(Exception):
    pass


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _turn_starts(session) -> list[int]:
    """Message indices (from the window start) where each in-window turn begins."""
    return [i for i in range(session.window_start, len(session.messages)) if session.messages[i].role == "user"]


def choose_drop(session, user_text: str, reserve: int) -> int:
    """The new window start: drop the fewest oldest turns so that the next prompt + ``reserve`` fits."""
    b, ctx = session.backend, session.ctx_size
    starts = _turn_starts(session)[1:] + [len(session.messages)]
    for start in starts:
        n = len(b.render(session.template_messages(user_text, window_start=start)))
        if n + reserve <= ctx:
            return start
    n = len(b.render(session.template_messages(user_text, window_start=len(session.messages))))
    if n + 1 <= ctx:
        return len(session.messages)  # everything old dropped; less room for the reply than asked
    raise NoRoom(f"the new message alone needs {n} tokens but the context window is {ctx} tokens")


def _render_window(session, start: int) -> list[int]:
    """Tokens of the window from message ``start`` on (no new message, no assistant header)."""
    msgs = session.template_messages(window_start=start)
    return session.backend.render(msgs, add_generation_prompt=False) if msgs else []


def make_room(session, user_text: str, reserve: int) -> MemoryAction:
    """Apply the session's policy so the next turn fits. Raises NoRoom if even that cannot help."""
    policy = session.config.memory
    new_start = choose_drop(session, user_text, reserve)
    b = session.backend
    old_window = _render_window(session, session.window_start)
    new_window = _render_window(session, new_start)
    dropped_tokens = max(len(old_window) - len(new_window), 0)
    dropped = session.messages[session.window_start : new_start]
    action = MemoryAction(policy, "dropped", len(dropped), dropped_tokens, kv_before=len(session.ledger))

    if policy == "summary":
        note = summarize(session, dropped)
        if note is None:
            action.note = "summary rejected (it named things the turns did not), turns dropped instead"
        else:
            session.memory_note = (session.memory_note + " " + note).strip()[-NOTE_MAX_CHARS:]
            action.action, action.summarized_tokens, action.note = "summarized", dropped_tokens, note
    elif policy == "shift":
        reason = _shift(session, old_window, new_window, dropped_tokens)
        if reason is None:
            action.action = "shifted"
        else:
            action.note = f"shift not possible ({reason}); fell back to sliding"
    session.window_start = new_start
    action.kv_after = len(session.ledger)
    return action


def _shift(session, old_window: list[int], new_window: list[int], dropped_tokens: int) -> str | None:
    """Remove the dropped turns' cells from the KV cache; None on success, else the reason it was not done."""
    b = session.backend
    if not session.config.kv_cache:
        return "the KV cache is off"
    if not hasattr(b, "shift"):
        return f"the {b.name} backend cannot edit its cache"
    keep = _common_prefix(old_window, new_window)  # system prompt and other leading tokens: the attention sinks
    end = keep + dropped_tokens
    # The template must render the kept turns the same with or without the dropped ones,
    # and the cache must hold exactly those tokens where they are to be removed.
    if old_window[end:] != new_window[keep:]:
        return "the chat template re-renders the kept turns"
    if session.ledger[:end] != old_window[:end]:
        return "the cache does not hold the dropped turns as rendered"
    reason = b.shift(keep, dropped_tokens)
    if reason is None:
        del session.ledger[keep:end]
    return reason


# ---------------------------------------------------------------- summary
SUMMARY_SYSTEM = "You write short, factual notes about a conversation. Use only facts stated in it."
_STOP = {"the", "a", "an", "i", "you", "he", "she", "it", "we", "they", "this", "that", "these", "those", "user",
         "assistant", "summary", "in", "on", "at", "and", "but", "then", "also", "they", "their", "his", "her", "my",
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


def summarize(session, dropped) -> str | None:
    """A short note on ``dropped`` messages from the loaded model (greedy), or None if it fails the check."""
    source = "\n".join(f"{m.role}: {m.content}" for m in dropped)
    b, ctx = session.backend, session.ctx_size
    while True:
        msgs = [{"role": "system", "content": SUMMARY_SYSTEM},
                {"role": "user", "content": f"Summarize this conversation in at most two short sentences.\n\n{source}"}]  # fmt: skip
        ids = b.render(msgs)
        if len(ids) + SUMMARY_MAX_TOKENS <= ctx or len(source) < 64:
            break
        source = source[len(source) // 4 :]  # keep the most recent part of what is being dropped
    if len(ids) + SUMMARY_MAX_TOKENS > ctx:
        return None
    text = session.complete(ids, SUMMARY_MAX_TOKENS).strip()
    if not text or unsupported_claims(text, source):
        return None
    return text

"""Incremental detokenization: turn a growing list of token ids into text deltas.

Decoding token by token breaks multi-byte characters and words whose spacing depends on the neighbours,
so each step decodes a short window and emits only text that is complete (no trailing U+FFFD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StreamDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that gives context to the next token
        self._read = 0  # ids up to here have been emitted as text
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever the windowed deltas have not emitted yet; returns the remaining text."""
        full = self._decode(self.ids)
        if full.startswith(self.emitted):
            delta = full[len(self.emitted) :]
        else:  # should not happen; never lose text
            delta = ""
        self.emitted += delta
        return delta

    def text(self) -> str:
        return self._decode(self.ids)

"""Model and user text is shown as text: never as markup, never as terminal control sequences."""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, and C1 controls (0x80-0x9f, e.g. CSI 0x9b).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def _picture(m: re.Match) -> str:
    c = ord(m.group())
    if c < 0x20:
        return chr(0x2400 + c)  # U+2400 control pictures: ESC -> ␛
    if c == 0x7F:
        return "\u2421"  # ␡
    return f"\\x{c:02x}"


def neutralize(text: str) -> str:
    """Replace control characters with visible stand-ins so a terminal cannot act on them.

    ``\\r`` is shown as ␍ too: a bare carriage return would let text overwrite what was printed.
    """
    return _CONTROL.sub(_picture, text)

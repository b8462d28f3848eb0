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


# The characters ``str.splitlines`` breaks a line at, other than "\n" (a text area would split the line there).
_LINE_BREAKS = {0x85: "\u2424", 0x2028: "\u2424", 0x2029: "\u2424"}  # ␤


def picture(ch: str) -> str:
    """One visible character standing for ``ch`` when it is a control character (or a line separator other
    than newline); ``ch`` itself otherwise. C0 controls and DEL get their Unicode control pictures
    (ESC -> ␛, BEL -> ␇, DEL -> ␡), NEL / U+2028 / U+2029 show as ␤, other C1 controls as � (U+FFFD)."""
    c = ord(ch)
    if c in _LINE_BREAKS:
        return _LINE_BREAKS[c]
    if ch in "\t\n" or not _CONTROL.fullmatch(ch):
        return ch
    if c < 0x20:
        return chr(0x2400 + c)
    return "\u2421" if c == 0x7F else "\ufffd"


_PICTURES = {
    c: picture(chr(c)) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029) if chr(c) not in "\t\n"
}


def pictures(text: str) -> str:
    """``text`` with every control character replaced by one visible stand-in (see ``picture``): character
    for character, so positions in the result are positions in ``text``. Tab and newline are kept."""
    return text.translate(_PICTURES)


def one_newline(text: str) -> str:
    """Every line break as "\\n": terminals send CR (or CRLF) for the newlines of a paste."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def count(n: int | None, unit: str) -> str:
    """``n`` with its unit, singular or plural ("1 token", "2 tokens"); n/a when unknown."""
    if n is None:
        return "n/a"
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"

"""Terminal input: a bracketed paste arrives whole, in order, with every character it holds.

Textual's ``XTermParser`` (8.2) treats an ESC *inside* a bracketed paste as the start of an escape sequence:
the characters after it are re-issued as key presses (ESC as ``^``, BEL as a ``ctrl+g`` key that inserts
nothing) and sent at once, while the ``Paste`` event carries only the text before the ESC and comes after
them. Pasting ``AAA \\x1b[2J BBB \\x07 CCC`` typed ``^[2J BBB  CCC`` and then pasted ``AAA `` behind it.

``PasteParser`` lets Textual's parser do everything else (keys, mouse, focus, resize, reports) and takes the
text between ``ESC[200~`` and ``ESC[201~`` itself, character for character, as one ``Paste`` event.
``FmchatDriver`` is Textual's Linux driver reading with it.
"""

from __future__ import annotations

import types
from collections.abc import Generator

from textual import events
from textual._parser import ParseEOF, ParseError, Peek1, Read1, TokenCallback
from textual._xterm_parser import BRACKETED_PASTE_END, BRACKETED_PASTE_START, XTermParser
from textual.drivers.linux_driver import LinuxDriver
from textual.message import Message


class PasteParser(XTermParser):
    """Textual's xterm parser, except that a bracketed paste is taken verbatim (ESC, BEL, NUL... included)."""

    def parse(self, token_callback: TokenCallback) -> Generator[Read1 | Peek1, str, None]:
        def everything_but_pastes(token: Message) -> None:
            if not isinstance(token, events.Paste):  # pastes are taken here, whole
                token_callback(token)

        inner = super().parse(everything_but_pastes)
        awaiting = next(inner)
        recent = ""  # the last characters the inner parser read, to see a paste start
        while True:
            try:
                character = yield awaiting
            except ParseError as exc:  # a timeout (a lone ESC is the Escape key) or the end of input
                try:
                    awaiting = inner.throw(exc)
                except StopIteration:
                    return
                continue
            consumed = isinstance(awaiting, Read1)
            try:
                awaiting = inner.send(character)
            except StopIteration:
                return
            if not consumed:
                continue
            recent = (recent + character)[-len(BRACKETED_PASTE_START) :]
            if recent != BRACKETED_PASTE_START:
                continue
            # The inner parser has just entered its paste mode. Read the paste up to its end marker here.
            pasted: list[str] = []
            while True:
                try:
                    c = yield self.read1()
                except ParseEOF:
                    token_callback(events.Paste("".join(pasted)))
                    return
                pasted.append(c)
                if c == "~" and "".join(pasted[-len(BRACKETED_PASTE_END) :]) == BRACKETED_PASTE_END:
                    break
            # Let the inner parser leave its paste mode (the empty paste it reports is dropped), then deliver.
            for c in BRACKETED_PASTE_END:
                awaiting = inner.send(c)
            token_callback(events.Paste("".join(pasted[: -len(BRACKETED_PASTE_END)])))
            recent = ""


def _reading_with(parser_cls: type, method):
    """``method`` (a function of Textual's driver module) as it is, except that the name ``XTermParser`` in it means
    ``parser_cls``: Textual's own code, run with one global looked up differently. No copy of it lives here."""
    names = dict(method.__globals__, XTermParser=parser_cls)
    return types.FunctionType(method.__code__, names, method.__name__, method.__defaults__, method.__closure__)


class FmchatDriver(LinuxDriver):
    """Textual's Linux driver, reading the terminal with ``PasteParser``. Textual builds its parser inside
    ``LinuxDriver.run_input_thread``, so that method runs here with ``XTermParser`` resolved to ``PasteParser``."""

    run_input_thread = _reading_with(PasteParser, LinuxDriver.run_input_thread)

"""F1: every key the app knows, in one table."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS: list[tuple[str, str]] = [
    ("Enter", "send the message"),
    ("Ctrl+J", "insert a newline (also Shift+Enter / Alt+Enter where the terminal reports them)"),
    ("Escape", "cancel the reply being generated (the app keeps running)"),
    ("Ctrl+N", "new chat"),
    ("Ctrl+R", "retry the last turn"),
    ("Ctrl+Y", "copy the last reply to the clipboard"),
    ("F2", "settings"),
    ("F3", "show or hide the inference panel"),
    ("F4", "saved sessions: open, search, rename, delete, new chat"),
    ("Ctrl+T", "change theme"),
    ("Ctrl+P", "command palette (every action above, and more)"),
    ("F1", "this help"),
    ("PgUp / PgDn", "scroll the conversation"),
    ("Ctrl+Q", "quit (a reply in progress is cancelled first)"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
        table.add_column("Key", no_wrap=True)
        table.add_column("Action")
        for key, what in KEYS:
            table.add_row(key, what)
        with Vertical(id="help-dialog") as box:
            box.border_title = "fmchat keys"
            box.border_subtitle = "Esc closes"
            yield Static(table)

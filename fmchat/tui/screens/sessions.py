"""F4: saved sessions. A list (newest first) with title, model, date and message count; search as you
type; Enter opens, R renames, D deletes (after a confirmation), N starts a new chat, Esc closes. In a narrow
terminal the model column goes and the date is shorter, so that title, date and count always fit; a title
too long for its column ends with "…".

The screen dismisses with ("open", id), ("new", None), or None; renames and deletions happen here.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Static

from fmchat.text import neutralize

DIALOG_CSS = """
.sessions-dialog {
    width: 100;
    max-width: 95%;
    height: auto;
    max-height: 90%;
    border: thick $primary;
    border-title-style: bold;
    background: $surface;
    padding: 1 2;
}
#confirm-buttons { height: auto; align-horizontal: right; margin-top: 1; }
#confirm-buttons Button { margin-left: 2; }
"""


class SessionDeleted(Message):
    """The chat on screen was deleted from the store: the app stops saving to it."""

    def __init__(self, session_id: str) -> None:
        super().__init__()
        self.session_id = session_id


def _when(t: float, short: bool = False) -> str:
    return datetime.fromtimestamp(t).strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M")


WIDE = 90  # inner width of the dialog from which the list has every column
CELL_PAD = 2  # DataTable: one cell of padding either side of each column
MODEL_WIDTH = 24  # at most, in the wide list


def list_columns(inner: int) -> list[tuple[str, str, int | None]]:
    """(key, header, width) of the list's columns for a dialog ``inner`` cells wide; the title's width (None
    here) is what the others leave."""
    if inner >= WIDE:
        return [("title", "Title", None), ("model", "Model", MODEL_WIDTH), ("updated", "Updated", 16),
                ("messages", "Messages", 8)]  # fmt: skip
    return [("title", "Title", None), ("updated", "Updated", 11), ("messages", "Msgs", 4)]


class SessionTable(DataTable):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "screen.rename", "Rename"),
        Binding("d,delete", "screen.delete", "Delete"),
        Binding("n", "screen.new_chat", "New chat"),
        Binding("slash", "screen.focus_search", "Search", show=False),
    ]


class RenameScreen(ModalScreen[str | None]):
    DEFAULT_CSS = "RenameScreen { align: center middle; }" + DIALOG_CSS
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current = title

    def compose(self) -> ComposeResult:
        with Vertical(id="rename-dialog", classes="sessions-dialog") as box:
            box.border_title = "Rename session"
            box.border_subtitle = "Enter saves · Esc cancels · empty: back to the first message"
            yield Input(self.current, id="rename-input", select_on_focus=True)

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    DEFAULT_CSS = "ConfirmScreen { align: center middle; }" + DIALOG_CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "answer(False)", "No"),
        Binding("y", "answer(True)", "Yes"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="sessions-dialog") as box:
            box.border_title = "Confirm"
            yield Static(Text(self.question), id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Delete (y)", id="confirm-yes", variant="error")
                yield Button("Keep (n)", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class SessionsScreen(ModalScreen["tuple[str, str | None] | None"]):
    DEFAULT_CSS = (
        DIALOG_CSS
        + """
    SessionsScreen { align: center middle; }
    #sessions-table { height: auto; max-height: 24; margin: 1 0; }
    """
    )
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("down", "focus_table", "List", show=False),
    ]

    def __init__(self, store, current_id: str | None = None, search: bool = False) -> None:
        super().__init__()
        self.store = store
        self.current_id = current_id
        self.start_in_search = search
        self.rows: list = []  # SessionInfo shown, in order
        self.columns: list[tuple[str, str, int]] = []  # (key, header, width) of the list's columns now

    def compose(self) -> ComposeResult:
        with Vertical(id="sessions-dialog", classes="sessions-dialog") as box:
            box.border_title = "Sessions"
            box.border_subtitle = "Enter open · R rename · D delete · N new chat · / search · Esc close"
            yield Input(placeholder="Search titles and messages…", id="sessions-search")
            yield SessionTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="sessions-status", markup=False)

    def on_mount(self) -> None:
        self.reload()
        (self.query_one(Input) if self.start_in_search or not self.rows else self.query_one(SessionTable)).focus()

    def on_resize(self, event) -> None:
        if self.is_mounted and self._columns_for() != self.columns:
            self.reload(keep=getattr(self.selected(), "id", None))

    def _inner_width(self) -> int:
        """The list's width: the dialog (at most 100 cells, 95% of the screen) less its border, padding and
        the table's scroll bar."""
        return min(100, self.app.size.width * 95 // 100) - 2 - 4 - 2

    def _columns_for(self) -> list[tuple[str, str, int]]:
        inner = self._inner_width()
        cols = list_columns(inner)
        fixed = sum(w + CELL_PAD for _, _, w in cols if w is not None)
        return [(k, h, w if w is not None else max(8, inner - fixed - CELL_PAD)) for k, h, w in cols]

    # ------------------------------------------------------------------ data
    @property
    def search_text(self) -> str:
        return self.query_one("#sessions-search", Input).value

    def reload(self, keep: str | None = None) -> None:
        table = self.query_one(SessionTable)
        status = self.query_one("#sessions-status", Static)
        if self.store is None:
            self.rows = []
            table.clear()
            status.update("sessions are not being saved (the store could not be opened)")
            return
        self.rows = self.store.list_sessions(self.search_text)
        cols = self._columns_for()
        if cols != self.columns:
            table.clear(columns=True)
            for key, header, width in cols:
                table.add_column(header, width=width, key=key)
            self.columns = cols
        table.clear()
        widths = {key: width for key, _, width in cols}
        short = "model" not in widths
        for r in self.rows:
            title = neutralize(r.title) or "(empty)"
            if r.id == self.current_id:
                title = "● " + title
            cells = {"title": title, "model": neutralize(r.model), "updated": _when(r.updated, short),
                     "messages": str(r.message_count)}  # fmt: skip
            row = []
            for key, _, width in cols:
                cell = Text(cells[key], no_wrap=True)
                cell.truncate(width, overflow="ellipsis")
                row.append(cell if key in ("title", "model") else cell.plain)
            table.add_row(*row, key=r.id)
        n = len(self.rows)
        what = f"{n} session{'s' if n != 1 else ''}"
        status.update(what + (f" matching '{self.search_text}'" if self.search_text.strip() else ""))
        if keep is not None:
            for i, r in enumerate(self.rows):
                if r.id == keep:
                    table.move_cursor(row=i)

    def selected(self):
        table = self.query_one(SessionTable)
        if not self.rows or table.cursor_row is None or not (0 <= table.cursor_row < len(self.rows)):
            return None
        return self.rows[table.cursor_row]

    # ------------------------------------------------------------------ events and actions
    @on(Input.Changed, "#sessions-search")
    def _search(self, event: Input.Changed) -> None:
        self.reload()

    @on(Input.Submitted, "#sessions-search")
    def _search_done(self, event: Input.Submitted) -> None:
        if self.rows:
            self.query_one(SessionTable).focus()

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        row = self.selected()
        if row is not None:
            self.dismiss(("open", row.id))

    def action_focus_table(self) -> None:
        if self.rows:
            self.query_one(SessionTable).focus()

    def action_focus_search(self) -> None:
        self.query_one(Input).focus()

    def action_close(self) -> None:
        self.dismiss(None)

    def action_new_chat(self) -> None:
        self.dismiss(("new", None))

    def action_rename(self) -> None:
        row = self.selected()
        if row is None:
            return

        def done(title: str | None) -> None:
            if title is not None:
                self.store.rename(row.id, title)
                self.reload(keep=row.id)

        self.app.push_screen(RenameScreen(row.title), done)

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete(row.id)
                if row.id == self.current_id:
                    self.current_id = None
                    self.app.post_message(SessionDeleted(row.id))
                self.reload()

        self.app.push_screen(
            ConfirmScreen(
                f"Delete “{neutralize(row.title) or row.id}” ({row.message_count} messages)? This cannot be undone."
            ),
            done,
        )

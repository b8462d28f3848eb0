"""The chat view: the conversation's blocks, the widget that runs turns, and the multi-line input.
Model and user text is shown as text, never as markup.

``ChatView`` owns the turn worker: ``start_turn(conversation, text)`` shows the exchange and runs
``Conversation.turn`` in a thread worker, which talks to the UI only by posting the typed messages below
(``TurnBegan``, ``TurnText``, ``TurnFinished``, ``TurnFailed``, then always ``TurnEnded``). The view draws
the reply from them; they bubble on to the app, which moves the panel and its own state. One ``TurnText``
is in flight at a time: text that arrives while the view draws the last piece goes out merged with the next
(so a fast model never floods the UI thread; nothing is dropped, and the turn's end flushes what is left).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import events, work
from textual.actions import SkipAction
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea
from textual.widgets.text_area import Document, DocumentNavigator, EditResult, Location, WrappedDocument

from fmchat.engine import ContextOverflow, TextDelta, TurnDone, TurnStarted, TurnStats
from fmchat.errors import FmchatError, describe
from fmchat.text import count, neutralize, one_newline, pictures

from .footer import TYPING_KEYS

# Keys the app binds that TextArea binds too (redo, cursor page up/down): in the message box they are the app's.
APP_KEYS = ("ctrl+y", "pageup", "pagedown")


def plain(text: str, style: str = "") -> Text:
    """Literal text for a Static: no Rich markup, no emoji codes, control characters made visible."""
    return Text(neutralize(text), style=style)


def fmt_rate(v: float | None) -> str:
    return "n/a tok/s" if v is None else f"{v:.1f} tok/s"


def reply_footer(stats: TurnStats) -> str:
    ttft = f"{stats.ttft_ms:.0f} ms" if stats.ttft_ms else "n/a"
    parts = [
        count(stats.generated_tokens, "token"),
        f"TTFT {ttft}",
        f"decode {fmt_rate(stats.decode_tok_s)}",
    ]
    if stats.cancelled:
        parts.append("cancelled" if stats.finish_reason == "cancelled" else f"stopped: {stats.finish_reason}")
    elif stats.finish_reason == "length":
        parts.append("stopped at max new tokens")
    elif stats.finish_reason == "context":
        parts.append("stopped: context window full")
    return " · ".join(parts)


# A streamed reply is drawn at most this often. Each draw lays out and renders the chat on the cores the model decodes
# on: measured on 2 cores (AVX512, SmolLM2-135M, compiled step, 128 tokens, tmux 120x40), drawing every token let the
# app decode at 41-43 tok/s against 83-87 for `fmchat run` (docs/tui.md).
STREAM_INTERVAL_S = 0.1

OUT_OF_WINDOW = "outside the model's window"  # the marker on turns the memory policy dropped


class UserMessage(Static):
    """What the user sent. ``index``: its place in the session's messages."""

    def __init__(self, text: str, index: int | None = None) -> None:
        super().__init__(plain(text), markup=False, classes="message user")
        self.border_title = "you"
        self.text = text
        self.index = index


class Note(Static):
    """A line from fmchat itself (errors, load results, new chat)."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(plain(text), markup=False, classes=f"note {kind}")


class AssistantMessage(Vertical):
    """A reply: Markdown streamed append-only, then a one-line footer with the turn's numbers. ``index``: its
    place in the session's messages."""

    def __init__(self, model_name: str = "assistant", index: int | None = None) -> None:
        super().__init__(classes="message assistant")
        self.border_title = Content(neutralize(model_name))  # Content: literal, never markup
        self.text = ""
        self.index = index
        self.markdown = Markdown("", classes="reply")
        self.footer = Static("", markup=False, classes="reply-footer")
        self._stream = None

    def compose(self):
        yield self.markdown
        yield self.footer

    async def write(self, fragment: str) -> None:
        """Append reply text. Control characters are neutralized; Markdown renders, Rich markup does not."""
        fragment = neutralize(fragment)
        if not fragment:
            return
        self.text += fragment
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        await self._stream.write(fragment)

    async def finish(self, stats: TurnStats | None, note: str | None = None) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if stats is not None:
            self.footer.update(Text(reply_footer(stats)))
            if stats.cancelled:
                self.add_class("cancelled")
        elif note:
            self.footer.update(Text(note))
        if not self.text:
            await self.markdown.update("*(no text)*")


class TypedDocument(Document):
    """The message box's document: the text exactly as typed or pasted, control characters included, shown with
    each control character as one visible picture (``fmchat.text.pictures``: ␛ for ESC, ␇ for BEL...).

    The lines the text area draws, wraps and moves the cursor over are the pictures; ``text`` and
    ``get_text_range`` (what is sent, copied, cut, or put back by undo) are the real characters. One picture
    per character keeps every (row, column) the same in both. A line break is a newline however it came.
    """

    def __init__(self, text: str) -> None:
        text = one_newline(text)
        super().__init__(pictures(text))
        self._typed: list[str] = text.split("\n")  # the real lines, row for row with self._lines

    @property
    def text(self) -> str:
        return "\n".join(self._typed)

    def get_text_range(self, start: Location, end: Location) -> str:
        if start == end:
            return ""
        (top_row, top_col), (bottom_row, bottom_col) = sorted((start, end))
        typed = self._typed
        if top_row == bottom_row:
            return typed[top_row][top_col:bottom_col]
        text = typed[top_row][top_col:] + "".join("\n" + typed[row] for row in range(top_row + 1, bottom_row))
        if bottom_row < len(typed):
            text += "\n" + typed[bottom_row][:bottom_col]
        return text

    def replace_range(self, start: Location, end: Location, text: str) -> EditResult:
        text = one_newline(text)
        top, bottom = sorted((start, end))
        (top_row, top_col), (bottom_row, bottom_col) = top, bottom
        replaced = self.get_text_range(top, bottom)
        shown = super().replace_range(start, end, pictures(text))  # the same splice on the pictures
        typed = self._typed
        lines = text.split("\n")
        lines[0] = (typed[top_row][:top_col] if top_row < len(typed) else "") + lines[0]
        lines[-1] += typed[bottom_row][bottom_col:] if bottom_row < len(typed) else ""
        typed[top_row : bottom_row + 1] = lines
        return EditResult(shown.end_location, replaced)


class ChatInput(TextArea):
    """Multi-line input: Enter sends; Ctrl+J (or Shift+Enter / Alt+Enter where the terminal reports them)
    inserts a newline. ``text`` is what was typed or pasted, control characters included (each shown as its
    picture, see ``TypedDocument``); that is what is sent."""

    # Shown in the footer. The keys themselves are handled in _on_key, in order with the typed characters
    # (a priority binding would run before characters typed in the same burst reach the text).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "send", "Send", show=True),
        Binding("ctrl+j", "newline", "Newline", show=True),
        # The app's keys that TextArea would take (redo, cursor page up/down): passed on to the app's bindings.
        Binding(",".join(APP_KEYS), "pass_to_app", show=False),
    ]
    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # A narrow terminal's footer has no room for Send / Newline: the placeholder says them. The keys
        # themselves are handled in _on_key either way.
        if action in ("send", "newline") and self.app.size.width < TYPING_KEYS:
            return False
        return super().check_action(action, parameters)

    def on_resize(self, event: events.Resize) -> None:
        self.refresh_bindings()

    def _set_document(self, text: str, language: str | None) -> None:
        # TextArea (Textual 8.2) builds its plain Document here, on creation and on every ``text = ...``.
        super()._set_document(text, language)
        self.document = TypedDocument(text)
        self.wrapped_document = WrappedDocument(self.document, tab_width=self.indent_width)
        self.navigator = DocumentNavigator(self.wrapped_document)
        self._rewrap_and_refresh_virtual_size()

    def action_pass_to_app(self) -> None:
        raise SkipAction()  # the binding lookup goes on up to the app

    def action_send(self) -> None:
        text = self.text
        if text.strip():
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_send()
        elif event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)


# ------------------------------------------------------------------ the conversation on screen
class TurnMessage(Message):
    """Base of the messages a turn posts (from the worker thread)."""


@dataclass
class TurnBegan(TurnMessage):
    """The prompt is matched against the KV cache; prefill starts (the user message is saved).
    ``window_start``: the first message still in the model's window (the memory policy has run)."""

    event: TurnStarted
    window_start: int = 0


@dataclass
class TurnText(TurnMessage):
    """Reply text. ``ttft_ms``: time from sending to this first piece (None after the first)."""

    event: TextDelta
    ttft_ms: float | None = None


@dataclass
class TurnFinished(TurnMessage):
    """The reply is complete (or cancelled, or stopped by a limit); ``event.stats`` is the turn's record."""

    event: TurnDone


@dataclass
class TurnFailed(TurnMessage):
    """The turn did not run (``before_start``: nothing changed, the text goes back to the input) or broke
    during the reply (the transcript keeps the partial reply)."""

    error: str
    text: str
    before_start: bool
    context_full: bool = False  # the prompt does not fit the context window (ContextOverflow)


@dataclass
class TurnEnded(TurnMessage):
    """The worker is done with the conversation: another turn, a reload or a restore may start."""


class ChatView(VerticalScroll):
    """The conversation: user messages, replies streamed as Markdown, notes. Runs one turn at a time.

    Messages that have left the model's window (the memory policy dropped them; they are in neither the
    prompt nor the KV cache) are dimmed and marked; the policy's note sits right before the reply it made
    room for."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current: AssistantMessage | None = None  # the reply being streamed
        self.current_user: UserMessage | None = None
        self._memory_policy = ""  # the memory policy of the turn under way
        self._window_before = 0  # the window's first message before the turn under way
        self._memory_note: Note | None = None  # the turn's note on what its memory policy did
        self._sent_at = 0.0
        self._first_text = True
        self._drawing = threading.Event()  # a TurnText is posted and not drawn yet

    def on_mount(self) -> None:
        self.anchor()  # follow new text while the view is at the bottom; scrolling up releases it

    # ------------------------------------------------------------------ blocks
    def note(self, text: str, kind: str = "info") -> Note:
        n = Note(text, kind)
        self.mount(n)
        return n

    def clear(self):
        """Remove every block (await the result to wait for it; blocks mounted after it stay)."""
        self.current = self.current_user = None
        return self.remove_children()

    async def show_transcript(self, messages, model_name: str, window_start: int = 0) -> None:
        """Draw a saved conversation (``ChatSession.messages``); replies carry their recorded footer. Messages
        before ``window_start`` are marked as outside the model's window."""
        await self.clear()
        for i, m in enumerate(messages):
            if m.role == "user":
                await self.mount(UserMessage(m.content, i))
            elif m.role == "assistant":
                w = AssistantMessage(model_name, i)
                await self.mount(w)
                w.text = neutralize(m.content)
                if w.text:
                    await w.markdown.update(w.text)
                await w.finish(m.stats, note=None if m.stats else "restored")
            else:
                self.note(f"system: {m.content}")
        self.mark_window(window_start)
        self.anchor()

    def mark_window(self, window_start: int) -> None:
        """Dim and mark the messages before ``window_start`` (out of the model's window); undim the others."""
        for w in self.query_children(".message"):
            out = w.index is not None and w.index < window_start
            w.set_class(out, "out-of-window")
            w.border_subtitle = OUT_OF_WINDOW if out else ""

    def drop_last_exchange(self) -> None:
        """Remove the last user message and everything after it (retry)."""
        users = list(self.query(UserMessage))
        if users:
            i = list(self.children).index(users[-1])
            self.remove_children(list(self.children)[i:])

    # ------------------------------------------------------------------ a turn
    def start_turn(self, conversation, text: str) -> None:
        """Show the exchange and run it in a thread worker (the caller knows no other turn runs)."""
        n = len(conversation.session.messages)  # where the turn's messages go in the session
        self.current_user = UserMessage(text, n)
        self.current = AssistantMessage(conversation.backend.model_name, n + 1)
        self._memory_policy = conversation.config.memory
        self._window_before = conversation.session.window_start
        self._memory_note = None
        self.mount(self.current_user)
        self.mount(self.current)
        self.anchor()
        self._sent_at = time.monotonic()
        self._first_text = True
        self._drawing.clear()
        self._turn_worker(conversation, text)

    @work(thread=True, group="turn")
    def _turn_worker(self, conversation, text: str) -> None:
        started = False
        pending: list[TextDelta] = []  # text not posted yet: the view is still drawing the last piece
        posted_at = 0.0

        def flush() -> None:
            if not pending:
                return
            last = pending[-1]
            merged = TextDelta("".join(d.text for d in pending), last.generated, last.ctx_used, last.elapsed_s)
            pending.clear()
            ttft = None
            if self._first_text:
                self._first_text = False
                ttft = (time.monotonic() - self._sent_at) * 1000
            self._drawing.set()
            self.post_message(TurnText(merged, ttft))

        try:
            for ev in conversation.turn(text):
                started = True
                if isinstance(ev, TurnStarted):  # the memory policy has run: the window is the turn's
                    self.post_message(TurnBegan(ev, conversation.session.window_start))
                elif isinstance(ev, TextDelta):
                    pending.append(ev)
                    # one piece in flight at a time, at most STREAM_INTERVAL_S apart (the first at once): drawing
                    # takes the CPU the model decodes on
                    if not self._drawing.is_set() and time.monotonic() - posted_at >= STREAM_INTERVAL_S:
                        flush()
                        posted_at = time.monotonic()
                elif isinstance(ev, TurnDone):
                    flush()
                    self.post_message(TurnFinished(ev))
        except FmchatError as exc:
            flush()
            full = isinstance(exc, ContextOverflow)
            self.post_message(TurnFailed(str(exc), text, before_start=not started, context_full=full))
        except Exception as exc:  # noqa: BLE001  shown in the chat, never as a traceback
            flush()
            self.post_message(TurnFailed(describe(exc), text, before_start=not started))
        finally:
            self.post_message(TurnEnded())

    async def on_turn_text(self, msg: TurnText) -> None:
        try:
            if self.current is not None:
                await self.current.write(msg.event.text)
        finally:
            self._drawing.clear()

    async def on_turn_began(self, msg: TurnBegan) -> None:
        self.mark_window(msg.window_start)
        if msg.window_start > self._window_before and self.current is not None:
            # Turns left the window to make room for this reply: say so before it, now (the turn's record
            # says exactly what, when the reply is done).
            self._memory_note = Note(f"memory policy '{self._memory_policy}': earlier turns left the window")
            await self.mount(self._memory_note, before=self.current)

    async def on_turn_finished(self, msg: TurnFinished) -> None:
        stats = msg.event.stats
        if self.current is not None:
            if stats.memory_note:  # what the policy did to make room for this reply, right before it
                text = f"memory policy '{self._memory_policy}': {stats.memory_note}"
                if self._memory_note is not None:
                    self._memory_note.update(plain(text))
                else:
                    await self.mount(Note(text), before=self.current)
            await self.current.finish(stats)

    async def on_turn_failed(self, msg: TurnFailed) -> None:
        if msg.before_start:
            # Nothing changed in the conversation: take the exchange off the screen.
            for w in (self.current_user, self.current):
                if w is not None:
                    await w.remove()
            self.current = self.current_user = None
        elif self.current is not None:
            await self.current.finish(None, note="stopped by an error")

    def on_turn_ended(self, msg: TurnEnded) -> None:
        self.current = self.current_user = None

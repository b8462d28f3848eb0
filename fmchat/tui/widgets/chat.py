"""The chat view's blocks and the multi-line input. Model and user text is shown as text, never as markup."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea

from fmchat.engine import TurnStats
from fmchat.text import neutralize


def plain(text: str, style: str = "") -> Text:
    """Literal text for a Static: no Rich markup, no emoji codes, control characters made visible."""
    return Text(neutralize(text), style=style)


def fmt_rate(v: float | None) -> str:
    return "n/a tok/s" if v is None else f"{v:.1f} tok/s"


def reply_footer(stats: TurnStats) -> str:
    ttft = f"{stats.ttft_ms:.0f} ms" if stats.ttft_ms else "n/a"
    tokens = "n/a" if stats.generated_tokens is None else stats.generated_tokens
    parts = [
        f"{tokens} tokens",
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


class UserMessage(Static):
    """What the user sent."""

    def __init__(self, text: str) -> None:
        super().__init__(plain(text), markup=False, classes="message user")
        self.border_title = "you"
        self.text = text


class Note(Static):
    """A line from fmchat itself (errors, load results, new chat)."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(plain(text), markup=False, classes=f"note {kind}")


class AssistantMessage(Vertical):
    """A reply: Markdown streamed append-only, then a one-line footer with the turn's numbers."""

    def __init__(self, model_name: str = "assistant") -> None:
        super().__init__(classes="message assistant")
        self.border_title = Content(neutralize(model_name))  # Content: literal, never markup
        self.text = ""
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


class ChatInput(TextArea):
    """Multi-line input: Enter sends; Ctrl+J (or Shift+Enter / Alt+Enter where the terminal reports them)
    inserts a newline."""

    # Shown in the footer. The keys themselves are handled in _on_key, in order with the typed characters
    # (a priority binding would run before characters typed in the same burst reach the text).
    BINDINGS = [
        Binding("enter", "send", "Send", show=True),
        Binding("ctrl+j", "newline", "Newline", show=True),
    ]
    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

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

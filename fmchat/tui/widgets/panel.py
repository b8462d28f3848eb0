"""The inference panel: what the conversation costs right now (context, KV cache, speed, memory, setup).

Every field is derived, at each refresh, from one record of the chat on screen (``ChatRecord.of``), never kept
from an earlier one:

* the setup (``Running.of``): from the *loaded* backend as it reports itself (llama.cpp: its GGUF's own
  quantization, e.g. Q4_1; kernel "llama.cpp"); while none is loaded, only model and backend come from the
  config, the rest is n/a (the decode path: the one chosen); the decode row follows ``--compile auto``'s
  background compile (``decode_status()``: "eager · compiling step 23 s (41%)", then the compiled step), redrawn
  when it changes phase (the app's ``watch_decode`` callback) and once a second while idle;
* the figures of the backend now (``ChatSession.snapshot_stats()``: context, ``seq_lens``, KV and weight bytes),
  read again at the app's refresh rate while a turn prefills and decodes, so they move together;
* "this turn" (reused / prefilled tokens, TTFT, prefill and decode rate): ``ChatSession.current_turn``, the record
  the engine fills as the turn runs; None after a new chat, an opened session, a retry or a backend switch/reload;
* the chat's history (the decode-rate sparkline, the last drop of the memory policy): the turn records of the
  chat's messages, so a restored session brings its own back.

A figure the backend cannot know is ``None`` and shown as "n/a" at every moment, never 0 and never an earlier
value. On a text-level backend (an OpenAI-compatible server) the live rate counts stream chunks and says so.
Below ``NARROW_COLUMNS`` the panel collapses to a one-line summary; F3 opens it there (``toggle_compact``). At
120x40 the whole panel fits without scrolling: the Running rows are one line each (cut with "…", the decode row
two at most; the whole decode line is the section's tooltip) and the sparkline one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Sparkline, Static

from fmchat.backends.base import BackgroundDecode
from fmchat.engine.stats import fmt_bytes, peak_rss_mb, rss_mb
from fmchat.text import count, neutralize

BAR_WIDTH = 28
NARROW_COLUMNS = 100  # below this terminal width the panel is one line (F3 opens it)
NA = "n/a"
IDLE_TICKS = 5  # idle, the panel is read again on every 5th tick of the app's timer (once a second)


# The decode path before a model is loaded: the configured choice, as what it will run ("off"/"on": old names).
CHOSEN_DECODE = {"auto": "auto (compiled when ready)", "compiled": "compiled (at load)", "on": "compiled (at load)",
                 "eager": "eager", "off": "eager"}  # fmt: skip
# What the background compile does now (``StepBuild.phase``, by its first word), as the decode row says it.
_PHASES = {"waiting": "waiting to compile step", "loading": "loading cached step", "compiling": "compiling step",
           "saving": "saving compiled step"}  # fmt: skip


def decode_text(status: dict | None, path: str) -> str:
    """The Running section's decode row, short (the panel is ~38 columns): from the backend's ``decode_status()``
    (None: a backend without one, e.g. llama.cpp) and its ``decode_path``.

    compiling: "eager · compiling step 23 s (41%)" (no % without an estimate); ready: "eager · compiled step from
    the next reply"; compiled: ``decode_path`` ("compiled (inductor, cached, 14.0 s)"); failed / unavailable /
    eager: the reason, "eager (...)" or "eager: compile failed (...)"."""
    if not status:
        return path
    state = status.get("state")
    if state == "compiling":
        phase = str(status.get("phase") or "compiling").split(" ")[0]
        frac = status.get("fraction")
        pct = f" ({100 * frac:.0f}%)" if frac is not None else ""
        return f"eager · {_PHASES.get(phase, 'compiling step')} {status.get('elapsed_s') or 0:.0f} s{pct}"
    if state == "ready":
        return "eager · compiled step from the next reply"
    if state == "compiled":
        return path
    detail = str(status.get("detail") or path or "eager")
    detail = re.sub(r"^eager \(auto: ", "eager (", detail)  # the row is short; "auto" is the setting, not news
    return detail if detail.startswith("eager") else f"eager ({detail})"


@dataclass(frozen=True)
class Running:
    """What runs, keyed by the RunConfig field that chooses it (``compile``: the decode path as loaded, short; the
    whole line in ``decode_detail``, the Running section's tooltip)."""

    model: str = "—"
    backend: str = "—"
    device: str = "—"
    dtype: str = "—"
    quant: str = "—"
    kernel: str = "—"
    compile: str = "—"
    memory: str = "—"
    kv_cache: bool = True
    chat_template: str = "—"  # which template renders the chat, and why (the backend's report)
    decode_detail: str = ""  # the decode path's whole line (not a row)

    @classmethod
    def of(cls, backend, config) -> Running:
        """From the loaded ``backend`` and the ``config`` the chat runs with; while none is loaded (None), only
        what the config chooses by itself (the decode path as chosen): what a backend reports is n/a until one
        reports it."""
        from fmchat import models

        if backend is None:
            chosen = CHOSEN_DECODE.get(config.compile, config.compile)
            return cls(config.model or models.DEFAULT_MODEL, config.backend, NA, NA, NA, NA, chosen, config.memory,
                       config.kv_cache, NA, chosen)  # fmt: skip
        path = backend.decode_path
        status = backend.decode_status() if isinstance(backend, BackgroundDecode) else None
        detail = path if status is None else str(status.get("detail") or path)
        return cls(backend.model_name, backend.name, backend.device, backend.dtype, backend.quant or "none",
                   backend.kernel or "—", decode_text(status, path), config.memory, config.kv_cache,
                   backend.chat_template, detail)  # fmt: skip

    def rows(self) -> list[tuple[str, str]]:
        return [(RUNNING_LABELS[f.name], self.text(f.name)) for f in fields(self) if f.name in RUNNING_LABELS]

    def text(self, name: str) -> str:
        value = getattr(self, name)
        if name == "kv_cache":
            return "on (reused across turns)" if value else "off (rebuilt every turn)"
        return neutralize(str(value))


# The Running section's row label for each field (the pilot tests read the rows back by these labels).
RUNNING_LABELS = {"model": "model", "backend": "backend", "device": "device", "dtype": "dtype", "quant": "quant",
                  "kernel": "kernel", "compile": "decode", "memory": "memory", "kv_cache": "KV cache",
                  "chat_template": "template"}  # fmt: skip


@dataclass
class ChatRecord:
    """What the panel shows is derived from, for the chat on screen, read at one instant."""

    running: Running
    loaded: bool = False
    now: object | None = None  # TurnStats: the backend's figures now (snapshot_stats); None: no model loaded
    turn: object | None = None  # TurnStats: the turn running, or the last one run in this chat on this backend
    history: list = field(default_factory=list)  # TurnStats of this chat's finished turns, oldest first
    token_level: bool = True  # False: a text-level server; its rates count stream chunks
    generating: bool = False
    live_rate: float | None = None  # while generating: tokens (chunks) per second after the first, from the stream

    @classmethod
    def of(cls, conversation, settings, *, generating: bool = False, live_rate: float | None = None) -> ChatRecord:
        """From the app's ``Conversation`` (None before the first load) and its settings."""
        session = None if conversation is None else conversation.session
        if session is None:
            return cls(Running.of(None, settings))
        messages = list(session.messages)  # a copy: a worker may append while this is read
        history = [m.stats for m in messages if m.role == "assistant" and m.stats is not None]
        return cls(Running.of(session.backend, conversation.config), True, session.snapshot_stats(), session.current_turn,
                   history, session.token_level, generating, live_rate if generating else None)  # fmt: skip


@dataclass
class PanelState:
    """Everything the panel shows, derived from one ``ChatRecord``. None = unavailable ("n/a")."""

    running: Running = field(default_factory=Running)
    loaded: bool = False
    # context and KV cache
    ctx_used: int | None = None
    ctx_size: int | None = None
    seq_lens: list[int] | None = None
    kv_bytes: int | None = None  # allocated
    kv_used_bytes: int | None = None  # holding cached positions (grows with seq_lens)
    reused: int | None = None  # this turn's (None: no turn in this chat on this backend yet, or unknown)
    prefilled: int | None = None
    memory_last: str | None = None  # the last thing the memory policy did, e.g. "turn 5: 2 messages ... shifted"
    # speed
    generating: bool = False
    rate_unit: str = "tok/s"  # "chunks/s" where the backend streams text (what its live rate measures)
    live_tok_s: float | None = None  # the decode rate shown: live while generating, else the turn's
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_history: list[float] = field(default_factory=list)  # decode tok/s of each finished turn of this chat
    # memory
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    weights_bytes: int | None = None
    gpu_mem_mb: float | None = None

    # What runs, by name (read by tests and by the sections below).
    @property
    def model(self) -> str:
        return self.running.model

    @property
    def backend(self) -> str:
        return self.running.backend

    @property
    def device(self) -> str:
        return self.running.device

    @property
    def dtype(self) -> str:
        return self.running.dtype

    @property
    def quant(self) -> str:
        return self.running.quant

    @property
    def kernel(self) -> str:
        return self.running.kernel

    @property
    def decode_path(self) -> str:
        return self.running.compile

    @property
    def memory_policy(self) -> str:
        return self.running.memory

    @property
    def kv_cache(self) -> bool:
        return self.running.kv_cache

    @classmethod
    def derive(cls, rec: ChatRecord) -> PanelState:
        now, turn = rec.now, rec.turn
        finished = turn is not None and bool(turn.finish_reason)  # the engine has recorded how the turn ended
        live = rec.generating and not finished
        st = cls(running=rec.running, loaded=rec.loaded, generating=live)
        if now is not None:
            st.ctx_size = now.ctx_size
            st.seq_lens = None if now.seq_lens is None else list(now.seq_lens)
            st.kv_bytes, st.weights_bytes, st.gpu_mem_mb = now.kv_bytes, now.weights_bytes, now.gpu_mem_mb
            st.kv_used_bytes = now.kv_used_bytes
            st.ctx_used = now.ctx_used
        if turn is not None:
            st.reused, st.prefilled = turn.reused_tokens, turn.prefilled_tokens
            st.ttft_ms, st.prefill_tok_s = turn.ttft_ms or None, turn.prefill_tok_s  # 0 in old records: none came
            if not rec.token_level and st.ctx_used is None and finished:
                st.ctx_used = turn.ctx_used  # the server's count (prompt + reply), when it sent one; else None
        if not rec.token_level:
            st.rate_unit = "chunks/s"
        if live:
            st.live_tok_s = rec.live_rate
        elif turn is not None:
            if turn.decode_tok_s is not None:
                st.live_tok_s, st.rate_unit = turn.decode_tok_s, "tok/s"
            else:
                st.live_tok_s = turn.stream_chunks_s if not rec.token_level else None
        st.decode_history = [s.decode_tok_s for s in rec.history if s.decode_tok_s is not None]
        turns = list(rec.history)
        if turn is not None and not any(turn is s for s in turns):
            turns.append(turn)  # the turn running: its memory action happened before its prefill
        notes = [s for s in turns if s.memory_note]
        if notes:
            st.memory_last = f"turn {notes[-1].turn}: {notes[-1].memory_note}"
        st.rss_mb = rss_mb()
        st.peak_rss_mb = max(peak_rss_mb(), st.rss_mb)  # two reads, one instant apart
        return st


def mask_decode(text: str) -> str:
    """The decode row with what differs run to run masked: seconds, and the compile's estimated progress."""
    return re.sub(r"\((\d+)%\)", "(masked %)", re.sub(r"\b[0-9.]+ s\b", "masked s", text))


def _rate(v: float | None, unit: str = "tok/s") -> str:
    return NA if v is None else f"{v:.1f} {unit}"


def _ms(v: float | None) -> str:
    return NA if v is None else f"{v:.0f} ms"


def _mib(v: float | None) -> str:
    return NA if v is None else f"{v:.0f} MiB"


def context_bar(used: int | None, total: int | None, width: int = BAR_WIDTH) -> Text:
    if used is None or not total:
        return Text("░" * width, style="dim")
    frac = min(used / total, 1.0)
    filled = round(frac * width)
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="dim")
    return bar


def kv_size_text(s: PanelState) -> str:
    """The KV bytes in use (they grow with ``seq_lens``) and, where more is allocated up front (fmc's preallocated
    buffers, llama.cpp's window), the allocation: "1.1 MiB of 180.0 MiB"."""
    if s.kv_used_bytes is None or s.kv_bytes is None or s.kv_used_bytes == s.kv_bytes:
        return fmt_bytes(s.kv_bytes if s.kv_used_bytes is None else s.kv_used_bytes)
    return f"{fmt_bytes(s.kv_used_bytes)} of {fmt_bytes(s.kv_bytes)}"


def context_text(s: PanelState) -> str:
    used = NA if s.ctx_used is None else str(s.ctx_used)
    size = NA if s.ctx_size is None else count(s.ctx_size, "token")
    pct = f" ({100 * s.ctx_used / s.ctx_size:.1f}%)" if s.ctx_used is not None and s.ctx_size else ""
    return f"{used} / {size}{pct}"


def _key(rows: list[tuple[str, str | Text]]) -> tuple:
    """What a table of rows shows, comparable: the text and the styles of each value."""
    return tuple((k, v.plain, tuple(v.spans), str(v.style)) if isinstance(v, Text) else (k, v) for k, v in rows)


def _table(rows: list[tuple[str, str | Text]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else Text(v))
    return t


class Clamped:
    """Text wrapped to the width it is drawn at, at most ``max_lines`` lines (the last one cut with "…"); drawn
    wide enough, the whole text on one line."""

    def __init__(self, text: Text, max_lines: int = 2) -> None:
        self.text, self.max_lines = text, max_lines

    def __rich_measure__(self, console, options) -> Measurement:
        return Measurement.get(console, options, self.text)

    def __rich_console__(self, console, options):
        width = max(options.max_width, 2)
        lines = list(self.text.wrap(console, width, overflow="fold"))
        if len(lines) > self.max_lines:
            lines = lines[: self.max_lines]
            last = lines[-1]
            last.rstrip()
            last.truncate(width - 1)
            last.append("…")
        yield Text("\n").join(lines)


def running_table(rows: list[tuple[str, str]]) -> Table:
    """The Running section: one line per row (cut with "…" where narrower than the value), the decode row two at
    most, so that the whole panel fits a 40-line terminal."""
    decode = RUNNING_LABELS["compile"]
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, Clamped(Text(v)) if k == decode else Text(v, no_wrap=True, overflow="ellipsis"))
    return t


class Section(Static):
    def __init__(self, title: str, **kwargs) -> None:
        super().__init__("", markup=False, classes="panel-section", **kwargs)
        self.border_title = title


class InferencePanel(VerticalScroll):
    """Sections are plain Statics rebuilt from a PanelState; the decode history is a Sparkline. Narrow: one line."""

    DEFAULT_CSS = """
    InferencePanel #panel-summary { display: none; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    InferencePanel.-compact > * { display: none; }
    InferencePanel.-compact > #panel-summary { display: block; }
    """

    can_focus = False

    def __init__(self, *, mask_volatile: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_volatile = mask_volatile  # snapshot tests: hide figures that differ run to run
        self.state = PanelState()
        self.narrow = False  # the terminal is narrower than NARROW_COLUMNS
        self.expanded = False  # narrow, and F3 opened the whole panel anyway
        self._source: tuple = (None, None)  # (conversation, settings) the app last showed
        self._live_rate: float | None = None
        self._ticks = 0
        self._shown: dict = {}  # what each section was last drawn from (``_put``)

    def compose(self):
        yield Static("", id="panel-summary", markup=False)
        yield Section("Context", id="sec-context")
        yield Section("KV cache", id="sec-kv")
        yield Section("Speed", id="sec-speed")
        spark = Sparkline([], id="spark", summary_function=max)  # one line (fmchat.tcss): the panel fits 40 lines
        yield spark
        yield Static(Text("decode tok/s per turn", style="dim"), id="spark-label")
        yield Section("Memory", id="sec-memory")
        yield Section("Running", id="sec-running")

    # ------------------------------------------------------------------ what the app tells it
    def show(self, conversation, settings, *, generating: bool = False) -> None:
        """Derive everything again from the chat on screen: ``conversation`` (None before the first load) and the
        app's ``settings``. Called between turns, on every reset (new chat, opened session, switch, reload) and at
        the refresh rate while a turn or a restore runs."""
        self._source = (conversation, settings)
        if not generating:
            self._live_rate = None
        new = PanelState.derive(ChatRecord.of(conversation, settings, generating=generating, live_rate=self._live_rate))
        for f in fields(PanelState):  # every field replaced, in place (whoever holds ``state`` sees the new figures)
            setattr(self.state, f.name, getattr(new, f.name))
        if self.is_mounted:
            self.refresh_state()

    def turn_started(self, event) -> None:
        """A turn began: no live rate yet (the engine's record carries the rest)."""
        self._live_rate = None
        self.show(*self._source, generating=True)

    def turn_progress(self, event, ttft_ms: float | None = None) -> None:
        """A TextDelta: the live rate from the stream (drawn on the app's timer, not per token). ``generated``
        counts tokens, or stream chunks on a text-level backend (the unit shown says which)."""
        if event.generated > 1 and event.elapsed_s and event.elapsed_s > 0:
            self._live_rate = (event.generated - 1) / event.elapsed_s

    def turn_finished(self, *_) -> None:
        """The turn's record is in the chat now: derive again (the app is still generating until TurnEnded)."""
        self._live_rate = None
        self.show(*self._source)

    def clear_turn(self) -> None:
        """A new chat: derive again (the session's turn record went with the old chat)."""
        self.show(*self._source)

    def tick(self, *, generating: bool, busy: bool = True) -> None:
        """The app's timer (5 times a second): while a turn or a restore runs (``busy``) the figures are read again
        every time; idle, every IDLE_TICKS-th time (what moves without a turn: RSS, a decode path compiling)."""
        self._ticks += 1
        if busy or self._ticks % IDLE_TICKS == 0:
            self.show(*self._source, generating=generating)

    # ------------------------------------------------------------------ width
    def fit_width(self, columns: int) -> None:
        """The terminal is ``columns`` wide: below NARROW_COLUMNS, one line unless F3 opened the panel."""
        self.narrow = columns < NARROW_COLUMNS
        self._apply_mode()

    def toggle_compact(self) -> None:
        """Narrow: one line <-> the whole panel (not saved; the panel shows whole again when wide)."""
        self.expanded = not self.expanded
        self._apply_mode()

    @property
    def compact(self) -> bool:
        return self.narrow and not self.expanded

    def _apply_mode(self) -> None:
        compact = self.compact
        self.set_class(compact, "-compact")
        s = self.styles
        if compact:  # inline: a row across the top of the chat, whatever the app's stylesheet says of #panel
            s.dock, s.width, s.height, s.padding, s.overflow_y = "top", "100%", 1, (0, 1), "hidden"
            s.border_left = ("none", "transparent")
            s.border_bottom = ("none", "transparent")
        else:
            for rule in ("dock", "width", "height", "padding", "overflow_y", "border_left", "border_bottom"):
                s.clear_rule(rule)
        if self.is_mounted:
            self.refresh_state()

    # ------------------------------------------------------------------ drawing
    def running_rows(self) -> list[tuple[str, str]]:
        rows = self.state.running.rows()
        if self.mask_volatile:  # a decode path compiling in the background says for how long, and how far
            decode = RUNNING_LABELS["compile"]
            rows = [(k, mask_decode(v) if k == decode else v) for k, v in rows]
        return rows

    def summary(self) -> str:
        """The one-line form (fits 80 columns): context, KV bytes, decode rate, TTFT, RSS. The rate has no label, so
        it keeps its unit when unknown: "n/a tok/s" (or "n/a chunks/s"), never a bare "n/a"."""
        s = self.state
        used = NA if s.ctx_used is None else str(s.ctx_used)
        size = NA if s.ctx_size is None else str(s.ctx_size)
        pct = f" ({100 * s.ctx_used / s.ctx_size:.1f}%)" if s.ctx_used is not None and s.ctx_size else ""
        rss = "masked MiB" if self.mask_volatile and s.rss_mb is not None else _mib(s.rss_mb)
        live = " live" if s.generating and s.live_tok_s is not None else ""
        rate = f"{NA} {s.rate_unit}" if s.live_tok_s is None else _rate(s.live_tok_s, s.rate_unit)
        return (f"ctx {used}/{size}{pct} · KV {fmt_bytes(s.kv_used_bytes if s.kv_used_bytes is not None else s.kv_bytes)} · {rate}{live}"
                f" · TTFT {_ms(s.ttft_ms)} · RSS {rss}")  # fmt: skip

    def _put(self, selector: str, key, build) -> None:
        """Draw ``build()`` into the Static ``selector`` unless what it shows (``key``) is what it shows already:
        the panel is derived 5 times a second during a reply, and every Static redrawn is a layout and a render on
        the cores the model decodes on (docs/tui.md)."""
        if self._shown.get(selector) == key:
            return
        self._shown[selector] = key
        self.query_one(selector, Static).update(build())

    def refresh_state(self) -> None:
        s = self.state
        summary = self.summary()
        self._put("#panel-summary", summary, lambda: Text(summary))
        used = context_text(s)

        def context_section() -> Text:
            ctx = Text(used + "\n")
            ctx.append_text(context_bar(s.ctx_used, s.ctx_size))
            return ctx

        self._put("#sec-context", (used, s.ctx_used, s.ctx_size), context_section)

        seq = "[" + ", ".join(str(n) for n in s.seq_lens) + "] tokens" if s.seq_lens else NA
        kv = [
            ("seq_lens", seq),
            ("KV size", kv_size_text(s)),
            ("reused", NA if s.reused is None else f"{count(s.reused, 'token')} this turn"),
            ("prefilled", NA if s.prefilled is None else f"{count(s.prefilled, 'token')} this turn"),
            ("last drop", neutralize(s.memory_last) if s.memory_last else "none yet"),
        ]
        self._put("#sec-kv", _key(kv), lambda: _table(kv))

        live = _rate(s.live_tok_s, s.rate_unit) + (" (live)" if s.generating and s.live_tok_s is not None else "")
        speed = [("decode", live), ("TTFT", _ms(s.ttft_ms)), ("prefill", _rate(s.prefill_tok_s))]
        self._put("#sec-speed", _key(speed), lambda: _table(speed))
        history = list(s.decode_history)
        if self._shown.get("#spark") != history:
            self._shown["#spark"] = history
            self.query_one("#spark", Sparkline).data = history

        masked = "masked MiB"
        rss = masked if self.mask_volatile and s.rss_mb is not None else _mib(s.rss_mb)
        peak = masked if self.mask_volatile and s.peak_rss_mb is not None else _mib(s.peak_rss_mb)
        memory = [
            ("RSS", rss),
            ("peak RSS", peak),
            ("weights", fmt_bytes(s.weights_bytes)),
            ("KV cache", fmt_bytes(s.kv_bytes)),
            ("GPU", _mib(s.gpu_mem_mb)),
        ]
        self._put("#sec-memory", _key(memory), lambda: _table(memory))
        rows = self.running_rows()
        self._put("#sec-running", _key(rows), lambda: running_table(rows))
        detail = s.running.decode_detail
        shown = mask_decode(detail) if self.mask_volatile else detail
        tooltip = f"decode: {neutralize(shown)}" if detail else None
        if self._shown.get("tooltip") != tooltip:
            self._shown["tooltip"] = tooltip
            self.query_one("#sec-running", Static).tooltip = tooltip

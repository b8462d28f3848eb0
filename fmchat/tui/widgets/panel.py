"""The inference panel: what the conversation costs right now (context, KV cache, speed, memory, setup).

What it shows is derived from records, never copied field by field by the app:

* ``Running.of(backend, config)``: the setup, from the *loaded* backend when there is one (what it reports:
  llama.cpp's quant is "gguf", its kernel "llama.cpp"), from the config while none is loaded;
* ``PanelState.from_stats(stats, backend, config)``: the context/KV/memory figures of a ``TurnStats`` record
  (a finished turn's, or ``ChatSession.snapshot_stats()`` between turns) plus the setup;
* while a reply streams, the engine's events (``TurnStarted``, ``TextDelta``) move the live figures.

A figure the backend cannot know is ``None`` and shown as "n/a", never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Sparkline, Static

from fmchat.engine.stats import fmt_bytes, peak_rss_mb, rss_mb
from fmchat.text import neutralize

BAR_WIDTH = 28


@dataclass(frozen=True)
class Running:
    """What runs, keyed by the RunConfig field that chooses it (``compile``: the decode path as loaded)."""

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

    @classmethod
    def of(cls, backend, config) -> Running:
        """From the loaded ``backend`` (None while none is) and the ``config`` the chat runs with."""
        from fmchat import models

        if backend is None:
            decode = "eager" if config.compile == "off" else f"compile {config.compile} (at load)"
            return cls(config.model or models.DEFAULT_MODEL, config.backend, config.device, config.dtype, config.quant,
                       config.kernel, decode, config.memory, config.kv_cache, config.chat_template or "—")  # fmt: skip
        return cls(backend.model_name, backend.name, backend.device, backend.dtype, backend.quant or "none",
                   backend.kernel or "—", backend.decode_path, config.memory, config.kv_cache, backend.chat_template)  # fmt: skip

    def rows(self) -> list[tuple[str, str]]:
        return [(RUNNING_LABELS[f.name], self.text(f.name)) for f in fields(self)]

    def text(self, name: str) -> str:
        value = getattr(self, name)
        if name == "kv_cache":
            return "on (reused across turns)" if value else "off (rebuilt every turn)"
        return neutralize(str(value))


# The Running section's row label for each field (the pilot tests read the rows back by these labels).
RUNNING_LABELS = {"model": "model", "backend": "backend", "device": "device", "dtype": "dtype", "quant": "quant",
                  "kernel": "kernel", "compile": "decode", "memory": "memory", "kv_cache": "KV cache",
                  "chat_template": "template"}  # fmt: skip

# The figures a stats record carries (TurnStats field -> PanelState field).
_FIGURES = {"ctx_used": "ctx_used", "ctx_size": "ctx_size", "seq_lens": "seq_lens", "kv_bytes": "kv_bytes",
            "weights_bytes": "weights_bytes", "gpu_mem_mb": "gpu_mem_mb", "rss_mb": "rss_mb", "peak_rss_mb": "peak_rss_mb"}  # fmt: skip


@dataclass
class PanelState:
    """Everything the panel shows. None = unavailable ("n/a")."""

    running: Running = field(default_factory=Running)
    loaded: bool = False
    # context and KV cache
    ctx_used: int | None = None  # None until a model is loaded
    ctx_size: int | None = None
    seq_lens: list[int] | None = None
    kv_bytes: int | None = None
    reused: int | None = None  # this turn's, None before the first turn of a chat
    prefilled: int | None = None
    memory_last: str | None = (
        None  # the last thing the memory policy did, e.g. "turn 5: 2 messages (51 tokens) shifted…"
    )
    # speed
    generating: bool = False
    live_tok_s: float | None = None
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_history: list[float] = field(default_factory=list)  # decode tok/s of each finished turn
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
    def from_stats(cls, stats, backend, config) -> PanelState:
        """The figures of one stats record (None: no model loaded yet) and the setup they were measured on."""
        st = cls(running=Running.of(backend, config), loaded=backend is not None)
        if stats is not None:
            for src, dst in _FIGURES.items():
                value = getattr(stats, src)
                setattr(st, dst, list(value) if isinstance(value, list) else value)
        return st

    def absorb(self, new: PanelState) -> None:
        """Take the setup and the figures of ``new``; keep this chat's turn figures and history."""
        self.running, self.loaded = new.running, new.loaded
        for name in _FIGURES.values():
            setattr(self, name, getattr(new, name))

    def finish_turn(self, stats) -> None:
        """A finished turn's record: its figures, its speed, and what the memory policy did."""
        self.reused, self.prefilled = stats.reused_tokens, stats.prefilled_tokens
        self.ttft_ms = stats.ttft_ms or None  # 0 = no token came: unavailable, not zero
        self.prefill_tok_s = stats.prefill_tok_s
        self.live_tok_s = stats.decode_tok_s
        if stats.decode_tok_s is not None:
            self.decode_history.append(stats.decode_tok_s)
        if stats.memory_note:
            self.memory_last = f"turn {stats.turn}: {stats.memory_note}"
        self.generating = False

    def clear_turn(self) -> None:
        """A new chat: no turn figures yet."""
        self.reused = self.prefilled = self.memory_last = None


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} tok/s"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} MiB"


def context_bar(used: int | None, total: int | None, width: int = BAR_WIDTH) -> Text:
    if used is None or not total:
        return Text("░" * width, style="dim")
    frac = min(used / total, 1.0)
    filled = round(frac * width)
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="dim")
    return bar


def _table(rows: list[tuple[str, str | Text]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else Text(v))
    return t


class Section(Static):
    def __init__(self, title: str, **kwargs) -> None:
        super().__init__("", markup=False, classes="panel-section", **kwargs)
        self.border_title = title


class InferencePanel(VerticalScroll):
    """Sections are plain Statics rebuilt from a PanelState; the decode history is a Sparkline."""

    can_focus = False

    def __init__(self, *, mask_volatile: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_volatile = mask_volatile  # snapshot tests: hide figures that differ run to run
        self.state = PanelState()

    def compose(self):
        yield Section("Context", id="sec-context")
        yield Section("KV cache", id="sec-kv")
        yield Section("Speed", id="sec-speed")
        yield Sparkline([], id="spark", summary_function=max)
        yield Static(Text("decode tok/s per turn", style="dim"), id="spark-label")
        yield Section("Memory", id="sec-memory")
        yield Section("Running", id="sec-running")

    # ------------------------------------------------------------------ what the app tells it
    def show(self, stats, backend, config) -> None:
        """Between turns: the figures of ``stats`` (``session.snapshot_stats()``, None before a load) on the setup
        of ``backend`` (None while none is loaded) and ``config``."""
        self.state.absorb(PanelState.from_stats(stats, backend, config))
        self.sample_memory()
        self.refresh_state()

    def turn_started(self, event) -> None:
        st = self.state
        st.generating, st.live_tok_s, st.ttft_ms, st.prefill_tok_s = True, None, None, None
        st.reused, st.prefilled, st.ctx_size = event.reused_tokens, event.prefill_tokens, event.ctx_size
        self.refresh_state()

    def turn_progress(self, event, ttft_ms: float | None) -> None:
        """A TextDelta: live context fill and speed (refreshed on the app's timer, not per token)."""
        st = self.state
        if st.ttft_ms is None and ttft_ms is not None:
            st.ttft_ms = ttft_ms  # live estimate; the engine's figure follows with the turn's record
        st.ctx_used = event.ctx_used
        if event.ctx_used is not None and st.seq_lens is not None:
            st.seq_lens = [event.ctx_used]  # batch of one: the row's fill is the context used
        if event.generated and event.elapsed_s and event.elapsed_s > 0 and event.generated > 1:
            st.live_tok_s = (event.generated - 1) / event.elapsed_s

    def turn_finished(self, stats, backend, config) -> None:
        """The turn's record: its figures (context, KV, memory) and its speed."""
        self.state.absorb(PanelState.from_stats(stats, backend, config))
        self.state.finish_turn(stats)
        self.refresh_state()

    def clear_turn(self) -> None:
        self.state.clear_turn()

    # ------------------------------------------------------------------ drawing
    def sample_memory(self) -> None:
        """Cheap process-wide figures, safe to read while a turn runs in another thread."""
        self.state.rss_mb = rss_mb()
        self.state.peak_rss_mb = max(peak_rss_mb(), self.state.rss_mb)  # two reads, one instant apart

    def running_rows(self) -> list[tuple[str, str]]:
        return self.state.running.rows()

    def refresh_state(self) -> None:
        s = self.state
        known = s.ctx_used is not None and s.ctx_size
        pct = f" ({100 * s.ctx_used / s.ctx_size:.1f}%)" if known else ""
        used = "n/a" if s.ctx_used is None else s.ctx_used
        size = "n/a" if s.ctx_size is None else s.ctx_size
        ctx = Text(f"{used} / {size} tokens{pct}\n")
        ctx.append_text(context_bar(s.ctx_used, s.ctx_size))
        self.query_one("#sec-context", Static).update(ctx)

        seq = "[" + ", ".join(str(n) for n in s.seq_lens) + "] tokens" if s.seq_lens else "n/a"
        self.query_one("#sec-kv", Static).update(
            _table(
                [
                    ("seq_lens", seq),
                    ("KV size", fmt_bytes(s.kv_bytes)),
                    ("reused", "n/a" if s.reused is None else f"{s.reused} tokens this turn"),
                    ("prefilled", "n/a" if s.prefilled is None else f"{s.prefilled} tokens this turn"),
                    ("last drop", neutralize(s.memory_last) if s.memory_last else "none yet"),
                ]
            )
        )

        live = _rate(s.live_tok_s) + (" (live)" if s.generating and s.live_tok_s is not None else "")
        self.query_one("#sec-speed", Static).update(
            _table([("decode", live), ("TTFT", _ms(s.ttft_ms)), ("prefill", _rate(s.prefill_tok_s))])
        )
        self.query_one("#spark", Sparkline).data = list(s.decode_history)

        masked = "masked MiB"
        rss = masked if self.mask_volatile and s.rss_mb is not None else _mib(s.rss_mb)
        peak = masked if self.mask_volatile and s.peak_rss_mb is not None else _mib(s.peak_rss_mb)
        self.query_one("#sec-memory", Static).update(
            _table(
                [
                    ("RSS", rss),
                    ("peak RSS", peak),
                    ("weights", fmt_bytes(s.weights_bytes)),
                    ("KV cache", fmt_bytes(s.kv_bytes)),
                    ("GPU", _mib(s.gpu_mem_mb)),
                ]
            )
        )
        self.query_one("#sec-running", Static).update(_table(self.running_rows()))

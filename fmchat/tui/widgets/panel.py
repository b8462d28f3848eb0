"""The inference panel: what the conversation costs right now (context, KV cache, speed, memory, setup)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Sparkline, Static

from fmchat.engine.stats import fmt_bytes, peak_rss_mb, rss_mb
from fmchat.text import neutralize

BAR_WIDTH = 28


@dataclass
class PanelState:
    """Everything the panel shows. None = unavailable ("n/a")."""

    # what is running
    model: str = "—"
    backend: str = "—"
    device: str = "—"
    dtype: str = "—"
    quant: str = "none"
    kernel: str = "—"
    kv_cache: bool = True
    loaded: bool = False
    # context and KV cache
    ctx_used: int | None = None  # None until a model is loaded
    ctx_size: int | None = None
    seq_lens: list[int] | None = None
    kv_bytes: int | None = None
    reused: int | None = None
    prefilled: int | None = None
    memory_policy: str = "—"
    memory_last: str | None = None  # the last thing the memory policy did, e.g. "turn 5: 2 messages (51 tokens) shifted…"
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

    def sample_memory(self) -> None:
        """Cheap process-wide figures, safe to read while a turn runs in another thread."""
        self.state.rss_mb = rss_mb()
        self.state.peak_rss_mb = max(peak_rss_mb(), self.state.rss_mb)  # two reads, one instant apart

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
                    ("cache", "on (reused across turns)" if s.kv_cache else "off (rebuilt every turn)"),
                    ("seq_lens", seq),
                    ("KV size", fmt_bytes(s.kv_bytes)),
                    ("reused", "n/a" if s.reused is None else f"{s.reused} tokens this turn"),
                    ("prefilled", "n/a" if s.prefilled is None else f"{s.prefilled} tokens this turn"),
                    ("memory", s.memory_policy),
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
        self.query_one("#sec-running", Static).update(
            _table(
                [
                    ("model", neutralize(s.model)),
                    ("backend", s.backend),
                    ("device", s.device),
                    ("dtype", s.dtype),
                    ("quant", s.quant),
                    ("kernel", s.kernel),
                ]
            )
        )

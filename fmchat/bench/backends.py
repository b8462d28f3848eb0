"""`fmchat bench backends`: the same scripted conversation on each backend, one after another, in one run."""

from __future__ import annotations

import statistics
import sys

from rich.console import Console
from rich.table import Table

from fmchat.backends.base import BackgroundDecode

from . import report


def bench_backends(sessions: dict, user_turns: list[str], json_out: bool = False) -> dict:
    """``sessions`` maps a label to a ready ChatSession (greedy). Each runs the whole script."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    run = report.begin("bench backends")
    per_backend = {}
    for label, session in sessions.items():
        b = session.backend
        if isinstance(b, BackgroundDecode) and b.decode_status()["state"] == "compiling":
            log(f"[bench] {label}: waiting for the compiled decode step (the default path, auto)")
            b.wait_decode_step(progress=lambda s, f=None, lb=label: log(f"[bench] {lb}: {s}"))
        session.reset()
        session.run_turn("Hi.")  # warm-up, not measured
        session.reset()
        rows = []
        for i, text in enumerate(user_turns, 1):
            s = session.run_turn(text).stats
            rows.append({"turn": i, "prompt_tokens": s.prompt_tokens, "prefilled_tokens": s.prefilled_tokens,
                         "generated_tokens": s.generated_tokens, "ttft_ms": None if s.ttft_ms is None else round(s.ttft_ms, 1),
                         "decode_tok_s": round(s.decode_tok_s, 1) if s.decode_tok_s else None})  # fmt: skip
            log(f"[bench] {label:<14} turn {i:>2}: TTFT {report.num(s.ttft_ms, '.0f')} ms, "
                f"decode {report.num(s.decode_tok_s, '.1f')} tok/s")
        b = session.backend
        ttfts = [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]
        rates = [r["decode_tok_s"] for r in rows if r["decode_tok_s"]]
        per_backend[label] = {
            "backend": b.name, "model": b.model_name, "device": b.device, "dtype": b.dtype,
            "quant": b.quant, "decode_path": b.decode_path,
            "turns": rows,
            "ttft_ms_median": round(statistics.median(ttfts), 1) if ttfts else None,
            "ttft_ms_last": rows[-1]["ttft_ms"],
            "decode_tok_s_median": round(statistics.median(rates), 1) if rates else None,
        }  # fmt: skip
    result = {"backends": per_backend, "turns": len(user_turns), "vs_llamacpp": ratios(per_backend)}
    paths = report.decode_paths({label: v["decode_path"] for label, v in per_backend.items()})
    return report.emit(run, result, json_out, lambda: print_tables(per_backend, len(user_turns)), decode_path=paths)


def ratios(per_backend: dict) -> dict:
    """Each other backend's medians over llama.cpp's, from the same run: decode (higher is better) and TTFT (lower is
    better). Empty without a llama.cpp row."""
    ref = per_backend.get("llamacpp")
    if ref is None:
        return {}

    def over(a, b):
        return round(a / b, 3) if a is not None and b else None

    return {label: {"decode": over(v["decode_tok_s_median"], ref["decode_tok_s_median"]),
                    "ttft": over(v["ttft_ms_median"], ref["ttft_ms_median"])}
            for label, v in per_backend.items() if label != "llamacpp"}  # fmt: skip


def print_tables(per_backend: dict, n_turns: int) -> None:
    c = Console(highlight=False, width=140)
    t = Table(title="fmchat bench backends · per turn: TTFT ms / decode tok/s")
    t.add_column("turn", justify="right")
    for label in per_backend:
        t.add_column(label, justify="right")
    for i in range(n_turns):
        cells = []
        for v in per_backend.values():
            r = v["turns"][i]
            cells.append(f"{report.num(r['ttft_ms'], '.0f')} / {report.num(r['decode_tok_s'])}")
        t.add_row(str(i + 1), *cells)
    c.print(t)
    s = Table(title="summary")
    for col in ("backend", "model", "device", "dtype", "quant", "path", "TTFT median (ms)", "TTFT last turn (ms)", "decode median (tok/s)"):
        s.add_column(col)
    for label, v in per_backend.items():
        s.add_row(label, v["model"], v["device"], v["dtype"], v["quant"] or "n/a", v["decode_path"],
                  report.num(v["ttft_ms_median"], ".0f"), report.num(v["ttft_ms_last"], ".0f"),
                  f"{v['decode_tok_s_median']}" if v["decode_tok_s_median"] else "n/a")  # fmt: skip
    c.print(s)
    for label, r in ratios(per_backend).items():
        c.print(f"{label} vs llamacpp (medians, same run): decode {report.num(r['decode'], '.2f')}x, "
                f"TTFT {report.num(r['ttft'], '.2f')}x")

"""`fmchat bench turns`: the same scripted conversation with the KV cache on, then off, in one process.

Reports per-turn TTFT both ways and whether the greedy replies were token-identical; where they are
not (bf16 near-ties), the first diverging turn and token are reported, not hidden.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from . import report

WARMUP_PROMPT = "Hi."


@dataclass
class TurnRecord:
    turn: int
    prompt_tokens: int
    ctx_tokens: int
    ttft_ms: float | None
    reused: int
    prefilled: int
    decode_tok_s: float | None
    token_ids: list[int]
    reply: str


def run_pass(session, user_turns: list[str], kv_cache: bool, log) -> list[TurnRecord]:
    session.configure(kv_cache=kv_cache)
    session.reset()
    records = []
    for i, text in enumerate(user_turns, 1):
        done = session.run_turn(text)
        s = done.stats
        records.append(
            TurnRecord(i, s.prompt_tokens, s.ctx_used, s.ttft_ms, s.reused_tokens, s.prefilled_tokens, s.decode_tok_s,
                       list(session.messages[-1].token_ids), done.reply)
        )  # fmt: skip
        log(f"[bench] cache {'on ' if kv_cache else 'off'} turn {i:>2}: {s.prompt_tokens} prompt tokens, TTFT {_ms(s.ttft_ms)}")
    return records


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _ms(x: float | None) -> str:
    """A time in ms for the progress lines; a turn that produced no token has none."""
    return "n/a" if x is None else f"{x:.0f} ms"


def first_divergence(on: list[TurnRecord], off: list[TurnRecord]) -> dict | None:
    for a, b in zip(on, off):
        if a.token_ids != b.token_ids:
            k = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
            return {"turn": a.turn, "token": k}
    return None


def bench_turns(session, user_turns: list[str], json_out: bool = False) -> dict:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    run = report.begin("bench turns")
    # One throwaway turn so one-off start-up costs (allocator, thread pools) land in neither pass.
    session.reset()
    session.run_turn(WARMUP_PROMPT)
    on = run_pass(session, user_turns, True, log)
    off = run_pass(session, user_turns, False, log)
    div = first_divergence(on, off)
    identical_turns = sum(a.token_ids == b.token_ids for a, b in zip(on, off))
    b = session.backend
    rows = [
        {
            "turn": a.turn,
            "prompt_tokens_on": a.prompt_tokens,
            "prompt_tokens_off": c.prompt_tokens,
            "reused_on": a.reused,
            "prefilled_on": a.prefilled,
            "prefilled_off": c.prefilled,
            "ttft_on_ms": _round(a.ttft_ms),
            "ttft_off_ms": _round(c.ttft_ms),
            "ttft_ratio": round(a.ttft_ms / c.ttft_ms, 4) if a.ttft_ms and c.ttft_ms else None,
            "decode_tok_s_on": round(a.decode_tok_s, 1) if a.decode_tok_s else None,
            "decode_tok_s_off": round(c.decode_tok_s, 1) if c.decode_tok_s else None,
            "identical": a.token_ids == c.token_ids,
            "reply": a.reply,  # the cache-on pass's (the same as the other's where identical)
        }
        for a, c in zip(on, off)
    ]
    last = rows[-1]
    result = {
        "model": b.model_name,
        "backend": b.name,
        "device": b.device,
        "dtype": b.dtype,
        "max_new_tokens": session.config.gen.max_new_tokens,
        "turns": rows,
        "identical": div is None,
        "identical_turns": identical_turns,
        "first_divergence": div,
        "last_turn_ttft_ratio": last["ttft_ratio"],
    }
    summary = (
        f"turn {last['turn']}: TTFT {report.num(last['ttft_on_ms'], '.0f')} ms with the KV cache vs {report.num(last['ttft_off_ms'], '.0f')} ms "
        f"re-prefilling (ratio {report.num(last['ttft_ratio'], '.3f')}); replies token-identical in {identical_turns}/{len(rows)} turns"
        + ("" if div is None else f", first divergence at turn {div['turn']} token {div['token']}")
    )
    result["summary"] = summary
    return report.emit(run, result, json_out, lambda: print_table(result, rows, b), decode_path=b.decode_path)


def print_table(result: dict, rows: list[dict], b) -> None:
    table = Table(title=f"fmchat bench turns · {b.model_name} · {b.name} · {b.device} · {b.dtype}")
    for col in ("turn", "prompt tokens", "reused / prefilled (on)", "TTFT on (ms)", "TTFT off (ms)", "on/off", "decode on (tok/s)", "same reply"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["turn"]),
            str(r["prompt_tokens_on"]),
            f"{r['reused_on']} / {r['prefilled_on']}",
            report.num(r["ttft_on_ms"], ".0f"),
            report.num(r["ttft_off_ms"], ".0f"),
            report.num(r["ttft_ratio"], ".3f"),
            f"{r['decode_tok_s_on']:.1f}" if r["decode_tok_s_on"] else "n/a",
            "yes" if r["identical"] else "NO",
        )
    console = Console(highlight=False, width=120)
    console.print(table)
    console.print(result["summary"])

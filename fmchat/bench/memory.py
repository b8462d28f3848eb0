"""`fmchat bench memory`: a long chat in a small window under each memory policy, in one run.

Per policy: per-turn TTFT, context and KV fill, evictions; a recall probe (a fact from the system
prompt asked for at the end); and the perplexity of a fixed continuation given the state the policy
left, which shows what `shift`'s re-rotated cache costs in quality against `sliding`'s re-prefill.
"""

from __future__ import annotations

import math
import statistics
import sys

from rich.console import Console
from rich.table import Table

from fmchat.engine import ContextOverflow
from fmchat.engine.stats import fmt_bytes

from . import report

SYSTEM = "The user's name is Ada. Answer briefly."
PROBE = "What is my name?"
CONTINUATION = (
    "The sea was calm that evening, and the fishing boats came home one after another. "
    "On the quay, children counted the boats while their parents carried baskets of fish to the market."
)


def continuation_nll(session) -> float | None:
    """Mean negative log-likelihood (nats/token) of the continuation as the next user message."""
    return session.message_nll(CONTINUATION)


def run_policy(session, policy: str, user_turns: list[str], n_turns: int, log) -> dict:
    session.configure(memory=policy, system=SYSTEM)
    session.reset()
    rows, stopped = [], None
    for i in range(n_turns):
        text = user_turns[i % len(user_turns)]
        try:
            s = session.run_turn(text).stats
        except ContextOverflow as exc:
            stopped = {"turn": i + 1, "error": str(exc)}
            log(f"[bench] {policy:<8} turn {i + 1:>3}: stopped ({exc})")
            break
        rows.append({"turn": i + 1, "ttft_ms": None if s.ttft_ms is None else round(s.ttft_ms, 1), "prompt_tokens": s.prompt_tokens, "prefilled": s.prefilled_tokens,
                     "ctx_used": s.ctx_used, "kv_bytes": s.kv_bytes, "action": s.memory_action, "evicted": s.evicted_tokens})  # fmt: skip
        ttft = report.num(s.ttft_ms, ".0f")
        log(f"[bench] {policy:<8} turn {i + 1:>3}: ctx {s.ctx_used}/{s.ctx_size}, TTFT {ttft} ms {s.memory_action}")
    try:
        probe = session.run_turn(PROBE).reply
        recall = "ada" in probe.lower()
    except ContextOverflow:
        probe, recall = None, None
    nll = continuation_nll(session) if stopped is None else None
    first = next((r["turn"] for r in rows if r["action"]), None)
    timed = [r for r in rows if r["ttft_ms"] is not None]  # None: no token came
    before = [r["ttft_ms"] for r in timed if first and r["turn"] < first]
    after = [r["ttft_ms"] for r in timed if first and r["turn"] >= first]
    return {
        "policy": policy,
        "turns_completed": len(rows),
        "stopped": stopped,
        "max_ctx_used": max((r["ctx_used"] for r in rows if r["ctx_used"] is not None), default=None),  # None: unknown
        "max_kv_bytes": max((r["kv_bytes"] for r in rows if r["kv_bytes"] is not None), default=None),  # None: unknown
        "actions": sum(1 for r in rows if r["action"]),
        "evicted_tokens": sum(r["evicted"] for r in rows),
        "first_action_turn": first,
        "ttft_ms_median_before": round(statistics.median(before), 1) if before else None,
        "ttft_ms_median_after": round(statistics.median(after), 1) if after else None,
        "prefilled_median_after": statistics.median([r["prefilled"] for r in rows if first and r["turn"] >= first]) if after else None,
        "recall": recall,
        "probe_reply": probe,
        "continuation_ppl": round(math.exp(nll), 2) if nll is not None else None,
        "turns": rows,
    }


def bench_memory(session, user_turns: list[str], n_turns: int, policies: list[str], json_out: bool = False) -> dict:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    run = report.begin("bench memory")
    results = [run_policy(session, p, user_turns, n_turns, log) for p in policies]
    b = session.backend
    out = {"model": b.model_name, "backend": b.name, "device": b.device, "dtype": b.dtype, "ctx": session.ctx_size,
           "turns": n_turns, "policies": results}  # fmt: skip
    return report.emit(run, out, json_out, lambda: print_table(out))


def print_table(out: dict) -> None:
    results = out["policies"]
    t = Table(title=f"fmchat bench memory · {out['model']} · {out['backend']} · {out['device']} · {out['dtype']} · ctx {out['ctx']} tokens · "
                    f"{out['turns']} turns")  # fmt: skip
    for col in ("policy", "turns done", "max ctx (tokens)", "max KV", "actions", "evicted (tokens)", "TTFT before / after 1st action (median ms)",
                "prefilled/turn after (median)", "recall 'Ada'", "continuation ppl"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in results:
        before, after = report.num(r["ttft_ms_median_before"], ".0f"), report.num(r["ttft_ms_median_after"], ".0f")
        ttft = "n/a" if r["first_action_turn"] is None else f"{before} / {after}"
        t.add_row(
            r["policy"],
            f"{r['turns_completed']}" + (" (stopped)" if r["stopped"] else ""),
            report.num(r["max_ctx_used"]),
            fmt_bytes(r["max_kv_bytes"]),
            str(r["actions"]),
            str(r["evicted_tokens"]),
            ttft,
            "n/a" if r["prefilled_median_after"] is None else f"{r['prefilled_median_after']:.0f}",
            {True: "yes", False: "no", None: "n/a"}[r["recall"]],
            "n/a" if r["continuation_ppl"] is None else f"{r['continuation_ppl']:.2f}",
        )
    Console(highlight=False, width=160).print(t)

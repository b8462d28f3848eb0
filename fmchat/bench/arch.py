"""`fmchat bench arch`: does a model's architecture run end to end in fmchat? Five checks on one model, one verdict each.

All greedy on the shared conversation, float32 on the transformers backend (replies compared by token id, not text):

* ``reuse``     the KV cache reused across turns gives the same replies as re-prefilling every turn (sdpa), and
                turns after the first reuse more tokens than they prefill;
* ``fmc``       ``--kernel fmc`` (fmchat's own attention and preallocated cache) gives the same replies as sdpa;
* ``compiled``  ``--kernel fmc --compile on`` (the compiled one-token step) gives the same replies as eager fmc, and
                the decode path really is the compiled one;
* ``shift``     ``--memory shift`` in a small window (``--ctx 256``) over a long chat (the script repeats): every turn
                that needs room shifts the cache (none falls back to sliding), the window is never exceeded, and after
                the last shift every cache layer holds exactly the tokens of the ledger. Each layer type's RoPE (how
                its keys are re-rotated) is reported;
* ``llamacpp``  the llama.cpp backend on the same file: the shared conversation with the KV cache reused, and the
                same ``--memory shift`` chat (llama.cpp's own shift). Replies identical to the transformers ones are
                counted, not required (llama.cpp computes on the quantized blocks; transformers on a dequantized copy).

A check that cannot run here (llama.cpp not installed, a model that is not a GGUF) is reported as ``skipped`` with
the reason; one that raises is ``error``. The command exits non-zero unless every check run passed.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from fmchat.config import RunConfig
from fmchat.errors import FmchatError, describe

from . import report

CHECKS = ("reuse", "fmc", "compiled", "shift", "llamacpp")
WHAT = {
    "reuse": "KV cache reused = re-prefilled every turn (float32, sdpa)",
    "fmc": "--kernel fmc = sdpa (float32)",
    "compiled": "--compile on = eager (fmc, float32)",
    "shift": "--memory shift in a small window: every turn shifts, on every layer",
    "llamacpp": "llama.cpp backend on the same file (reuse, shift)",
}

OpenChat = Callable[[RunConfig], object]  # RunConfig -> a Conversation (save=False)


@dataclass
class Plan:
    model: str | None
    user_turns: list[str]
    max_new_tokens: int = 32
    shift_ctx: int = 256
    shift_turns: int = 18
    device: str = "cpu"
    threads: int | None = None
    replies: dict[str, list[list[int]]] = field(default_factory=dict)  # per path ("sdpa", "fmc", ...): reply ids per turn


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config(plan: Plan, **fields) -> RunConfig:
    base = {"model": plan.model, "device": plan.device, "dtype": "float32", "temperature": 0.0, "seed": 0,
            "threads": plan.threads, "max_new_tokens": plan.max_new_tokens, "memory": "none"}  # fmt: skip
    return RunConfig(**{**base, **fields}).check()


def _chat(conv, user_turns: list[str], label: str) -> tuple[list[list[int]], list]:
    """Run ``user_turns`` from an empty chat: each reply's token ids and each turn's stats."""
    conv.new_chat()
    ids, stats = [], []
    for i, text in enumerate(user_turns, 1):
        s = conv.run_turn(text).stats
        stats.append(s)
        ids.append(list(conv.session.messages[-1].token_ids))
        extra = f", {s.memory_action}" if s.memory_action else ""
        _log(f"[bench] {label:<18} turn {i:>2}/{len(user_turns)}: {s.prompt_tokens} prompt tokens, ctx {s.ctx_used}, "
             f"prefilled {s.prefilled_tokens}{extra}")  # fmt: skip
    return ids, stats


def _divergence(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """The first turn (1-based) and token where two runs' replies part, or None when every reply is the same."""
    for t, (x, y) in enumerate(zip(a, b), 1):
        if x != y:
            k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return {"turn": t, "token": k}
    return None


def _same(a: list[list[int]], b: list[list[int]]) -> dict:
    div = _divergence(a, b)
    n = sum(x == y for x, y in zip(a, b))
    return {"identical_turns": n, "turns": len(b), "first_divergence": div,
            "ok": div is None and len(a) == len(b) and len(b) > 0}  # fmt: skip


def _where(div: dict | None) -> str:
    return "" if div is None else f"; first divergence at turn {div['turn']} token {div['token']}"


def _replies(plan: Plan, open_chat: OpenChat, key: str, **fields) -> tuple[list[list[int]], str]:
    """The shared conversation's replies on one path (cached per path); and that path's decode path."""
    conv = open_chat(_config(plan, **fields))
    try:
        ids, _ = _chat(conv, plan.user_turns, key)
        path = conv.backend.decode_path
    finally:
        conv.close()
    plan.replies[key] = ids
    return ids, path


# ---------------------------------------------------------------- the checks
def check_reuse(plan: Plan, open_chat: OpenChat) -> dict:
    conv = open_chat(_config(plan, kernel="sdpa", compile="off"))
    try:
        t0 = time.perf_counter()
        on, stats = _chat(conv, plan.user_turns, "reuse: cache on")
        t1 = time.perf_counter()
        conv.apply(conv.config.override(kv_cache=False))
        off, _ = _chat(conv, plan.user_turns, "reuse: cache off")
        t2 = time.perf_counter()
    finally:
        conv.close()
    plan.replies["sdpa"] = on
    same = _same(on, off)
    reused = [s.reused_tokens for s in stats]
    prefilled = [s.prefilled_tokens for s in stats]
    reuses = _reuses(stats)
    summary = (f"token-identical in {same['identical_turns']}/{same['turns']} turns{_where(same['first_divergence'])}; "
               f"last turn reused {reused[-1]} / prefilled {prefilled[-1]} tokens")  # fmt: skip
    if not reuses:
        summary += "; a later turn did not reuse the previous turn's whole prompt"
    summary += f"; chat {t1 - t0:.0f} s with the cache, {t2 - t1:.0f} s without"
    return {**same, "ok": same["ok"] and reuses, "summary": summary, "reused_previous_prompt": reuses, "reused": reused,
            "prefilled": prefilled, "chat_s_cache_on": round(t1 - t0, 1), "chat_s_cache_off": round(t2 - t1, 1)}  # fmt: skip


def _reuses(stats: list) -> bool:
    """Whether every turn after the first reused (at least) the whole previous prompt from the KV cache."""
    return all((b.reused_tokens or 0) >= (a.prompt_tokens or 1) for a, b in itertools.pairwise(stats))


def check_fmc(plan: Plan, open_chat: OpenChat) -> dict:
    ref = plan.replies.get("sdpa") or _replies(plan, open_chat, "sdpa", kernel="sdpa", compile="off")[0]
    got, _ = _replies(plan, open_chat, "fmc", kernel="fmc", compile="off")
    same = _same(ref, got)
    return {**same, "summary": f"token-identical to sdpa in {same['identical_turns']}/{same['turns']} turns"
            + _where(same["first_divergence"])}  # fmt: skip


def check_compiled(plan: Plan, open_chat: OpenChat) -> dict:
    ref = plan.replies.get("fmc") or _replies(plan, open_chat, "fmc", kernel="fmc", compile="off")[0]
    got, path = _replies(plan, open_chat, "compiled", kernel="fmc", compile="on")
    same = _same(ref, got)
    compiled = path.startswith("compiled")
    summary = f"token-identical to eager in {same['identical_turns']}/{same['turns']} turns{_where(same['first_divergence'])}; decode {path}"
    return {**same, "ok": same["ok"] and compiled, "summary": summary, "decode_path": path}


def _shift_turns(plan: Plan) -> list[str]:
    n = len(plan.user_turns)
    return [plan.user_turns[i % n] for i in range(plan.shift_turns)]


def _shift_verdict(stats: list, ctx: int) -> dict:
    acted = [s for s in stats if s.memory_action]
    shifted = [s for s in acted if s.memory_action == "shifted"]
    fell_back = sorted({s.memory_note for s in acted if s.memory_action != "shifted"})
    max_used = max((s.ctx_used or 0) for s in stats) if stats else 0
    ok = bool(acted) and len(shifted) == len(acted) and max_used <= ctx
    return {"ok": ok, "turns_run": len(stats), "actions": len(acted), "shifted": len(shifted), "fell_back": fell_back,
            "max_ctx_used": max_used, "ctx": ctx, "first_shift_turn": shifted[0].turn if shifted else None,
            "max_prefilled_after_shift": max((s.prefilled_tokens for s in shifted), default=None)}  # fmt: skip


def layer_rope_summary(backend) -> list[dict] | str:
    """Per layer type: how many layers, and the RoPE their cached keys carry (kind, base, scaling factor) — what a
    shift re-rotates them with; or why fmchat cannot read it."""
    from fmchat.backends.transformers.rope import layer_ropes

    ropes = layer_ropes(backend.model, backend.ctx_size)
    if isinstance(ropes, str):
        return ropes
    out: dict[str | None, dict] = {}
    for r in ropes:
        row = out.setdefault(r.layer_type, {"layer_type": r.layer_type, "layers": 0, "rope": r.kind, "base": None, "factor": None})
        row["layers"] += 1
        if r.inv_freq is not None and len(r.inv_freq) > 1:  # inv_freq_i = base^(-2i/d) / factor (linear scaling)
            f0, f1 = float(r.inv_freq[0]), float(r.inv_freq[1])
            row["base"] = float(f"{(f0 / f1) ** len(r.inv_freq):.4g}")
            row["factor"] = float(f"{1 / f0:.4g}")
    return list(out.values())


def _cache_lengths(backend) -> list[int] | None:
    """Positions each layer of a transformers DynamicCache holds (-1: none); None where that is not the fill."""
    from fmchat.backends.transformers.backend import TransformersBackend

    if not isinstance(backend, TransformersBackend) or backend.kernel == "fmc":  # fmc's buffers are preallocated
        return None
    return [-1 if layer.keys is None else int(layer.keys.shape[-2]) for layer in backend.cache.layers]


def check_shift(plan: Plan, open_chat: OpenChat) -> dict:
    conv = open_chat(_config(plan, kernel="sdpa", compile="off", ctx=plan.shift_ctx, memory="shift"))
    try:
        ropes = layer_rope_summary(conv.backend)
        _, stats = _chat(conv, _shift_turns(plan), "shift")
        lengths = _cache_lengths(conv.backend)
        cached = conv.backend.cached_tokens()
    finally:
        conv.close()
    out = _shift_verdict(stats, plan.shift_ctx)
    out["layer_ropes"] = ropes
    out["cache_layer_lengths_equal_ledger"] = None if lengths is None else all(n == cached for n in lengths)
    if isinstance(ropes, str):
        out["ok"] = False
        out["summary"] = f"layer RoPE not readable: {ropes}"
        return out
    if out["cache_layer_lengths_equal_ledger"] is False:
        out["ok"] = False
    per_type = ", ".join(f"{r['layer_type'] or 'all'} x{r['layers']}: {r['rope']}"
                         + (f" base {r['base']:g}" if r["base"] else "") + (f" factor {r['factor']:g}" if r["factor"] not in (None, 1.0) else "")
                         for r in ropes)  # fmt: skip
    out["summary"] = _shift_summary(out) + f"; RoPE per layer type: {per_type}"
    if out["cache_layer_lengths_equal_ledger"] is False:
        out["summary"] += "; a cache layer does not hold the ledger's tokens"
    return out


def _shift_summary(v: dict) -> str:
    s = f"ctx {v['ctx']}, {v['turns_run']} turns: {v['shifted']}/{v['actions']} turns that needed room shifted, max ctx used {v['max_ctx_used']}"
    if v["fell_back"]:
        s += f"; fell back: {v['fell_back'][0]}"
    if not v["actions"]:
        s += "; the window never filled (no shift was tried)"
    return s


def check_llamacpp(plan: Plan, open_chat: OpenChat) -> dict:
    from fmchat import models, registry

    why = registry.BACKENDS.check("llamacpp")
    if why:
        return {"ok": None, "summary": f"skipped: {why}"}
    if models.resolve(plan.model).kind != "gguf":
        return {"ok": None, "summary": "skipped: the model is not a GGUF file"}
    conv = open_chat(_config(plan, backend="llamacpp"))
    try:
        ids, stats = _chat(conv, plan.user_turns, "llama.cpp")
    finally:
        conv.close()
    reuses = _reuses(stats)
    conv = open_chat(_config(plan, backend="llamacpp", ctx=plan.shift_ctx, memory="shift"))
    try:
        _, shift_stats = _chat(conv, _shift_turns(plan), "llama.cpp shift")
    finally:
        conv.close()
    shift = _shift_verdict(shift_stats, plan.shift_ctx)
    ref = plan.replies.get("sdpa")
    agree = None if ref is None else sum(x == y for x, y in zip(ref, ids))
    summary = f"{len(ids)} turns, " + ("each reused the previous prompt" if reuses else "a later turn did not reuse the previous prompt")
    summary += "; shift: " + _shift_summary(shift)
    if agree is not None:
        summary += f"; replies identical to transformers float32 in {agree}/{len(ids)} turns (not required)"
    return {"ok": reuses and shift["ok"] and len(ids) == len(plan.user_turns), "summary": summary, "turns": len(ids),
            "reused_previous_prompt": reuses, "shift": shift, "identical_to_transformers": agree}  # fmt: skip


RUN = {"reuse": check_reuse, "fmc": check_fmc, "compiled": check_compiled, "shift": check_shift, "llamacpp": check_llamacpp}


# ---------------------------------------------------------------- the run
def bench_arch(plan: Plan, checks: list[str], open_chat: OpenChat, json_out: bool = False) -> dict:
    """Run ``checks`` (in ``CHECKS`` order) on ``plan.model``; ``open_chat(config)`` builds each chat (a Conversation
    that saves nothing). Returns the result (what --json prints); ``result["passed"]``: every check run passed."""
    run = report.begin("bench arch")
    rows = []
    for name in [c for c in CHECKS if c in checks]:
        _log(f"[bench] check {name}: {WHAT[name]}")
        t0 = time.perf_counter()
        try:
            out = RUN[name](plan, open_chat)
        except FmchatError as exc:
            out = {"ok": False, "status": "error", "summary": describe(exc)}
        except Exception as exc:  # noqa: BLE001 - a check that crashes is reported, and the others still run
            out = {"ok": False, "status": "error", "summary": describe(exc)}
        status = out.pop("status", None) or {True: "pass", False: "fail", None: "skipped"}[out.pop("ok")]
        out.pop("ok", None)
        rows.append({"check": name, "what": WHAT[name], "status": status, "seconds": round(time.perf_counter() - t0, 1), **out})
        _log(f"[bench] check {name}: {status.upper()} - {rows[-1]['summary']}")
    result = {
        **_about(plan),
        "turns": len(plan.user_turns),
        "max_new_tokens": plan.max_new_tokens,
        "shift_ctx": plan.shift_ctx,
        "shift_turns": plan.shift_turns,
        "checks": rows,
        "passed": all(r["status"] in ("pass", "skipped") for r in rows) and any(r["status"] == "pass" for r in rows),
        "failed": [r["check"] for r in rows if r["status"] in ("fail", "error")],
    }
    return report.emit(run, result, json_out, lambda: print_table(result), threads=plan.threads)


def _about(plan: Plan) -> dict:
    """The model as the checks saw it: its name, and its architecture from the GGUF header (or config.json)."""
    from fmchat import model_stores, models

    src = models.resolve(plan.model)
    arch = None
    if src.kind == "gguf" and src.path is not None:
        arch = model_stores.gguf_general(src.path).get("general.architecture")
    elif src.path is not None and (src.path / "config.json").is_file():
        import json

        arch = json.loads((src.path / "config.json").read_text()).get("model_type")
    return {"model": src.name, "model_path": str(src.path) if src.path else src.hub_id, "architecture": arch}


def print_table(result: dict) -> None:
    t = Table(title=f"fmchat bench arch · {result['model']} · architecture {result['architecture'] or 'n/a'} · "
                    f"{result['turns']} turns, {result['max_new_tokens']} new tokens per reply · shift: ctx {result['shift_ctx']}, "
                    f"{result['shift_turns']} turns")  # fmt: skip
    t.add_column("check")
    t.add_column("what")
    t.add_column("verdict")
    t.add_column("s", justify="right")
    t.add_column("measured", overflow="fold")
    for r in result["checks"]:
        t.add_row(r["check"], r["what"], r["status"].upper(), f"{r['seconds']:.0f}", r["summary"])
    console = Console(highlight=False, width=180)
    console.print(t)
    n_pass = sum(r["status"] == "pass" for r in result["checks"])
    console.print(f"{n_pass}/{len(result['checks'])} checks passed" + (f"; failed: {', '.join(result['failed'])}" if result["failed"] else ""))

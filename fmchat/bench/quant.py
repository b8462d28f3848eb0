"""`fmchat bench quant`: every quantization scheme on one model, in one run, each in its own process.

Per scheme: weights bytes (parameters + buffers), RSS after load and peak RSS (its own process, so one
scheme's peak does not hide another's), decode tok/s over a greedy scripted conversation, perplexity on a
fixed public-domain English text (data/, non-overlapping windows, float32 log-softmax), and greedy-token
agreement with the unquantized (fp32) model: the reference's greedy replies are fed back teacher-forced
and we count the reply tokens whose top-1 prediction is the same — once in one many-row forward per turn (the
prefill's products), once one token at a time (the decode path's one-row products, which may differ: ``q8`` rounds
the activations to int8); also how many whole replies came out token-identical when each scheme generated freely.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import report

ROWS = {  # label -> (quant, dtype)
    "fp32": ("none", "float32"),
    "bf16": ("bf16", "auto"),
    "fp16": ("fp16", "auto"),
    "int8": ("int8", "auto"),
    "int4": ("int4", "auto"),
    "log8": ("log8", "auto"),
}
REFERENCE = "fp32"
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-3.txt"
WINDOW = 512


def perplexity(backend, text: str, window: int = WINDOW) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows; returns (perplexity, tokens evaluated)."""
    import torch

    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, window):
            chunk = ids[i : i + window]
            if len(chunk) < 2:
                break
            logits = backend.model(input_ids=torch.tensor([chunk], device=backend.device), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            target = torch.tensor(chunk[1:], device=logp.device)
            nll -= float(logp.gather(1, target[:, None]).sum())
            n += len(chunk) - 1
    return math.exp(nll / n), n


def teacher_forced_agreement(backend, ref_turns: list[dict]) -> tuple[int, int]:
    """Reply tokens of the reference whose top-1 prediction this model shares, fed the reference's context."""
    import torch

    same = total = 0
    with torch.inference_mode():
        for t in ref_turns:
            prompt, reply = t["prompt_ids"], t["reply_ids"]
            if not reply:
                continue
            seq = prompt + reply
            logits = backend.model(
                input_ids=torch.tensor([seq[:-1]], device=backend.device), use_cache=False, logits_to_keep=len(reply)
            ).logits[0]
            pred = logits.argmax(dim=-1).tolist()
            same += sum(a == b for a, b in zip(pred, reply))
            total += len(reply)
    return same, total


def decode_step_agreement(backend, ref_turns: list[dict]) -> tuple[int, int]:
    """As ``teacher_forced_agreement``, but through the decode path: each turn's prompt prefilled, then the reference's
    reply fed one token at a time (``backend.forward``), each step's top-1 compared with the reference's next token.
    The one-row products (the kernels a reply is generated with: ``q8`` quantizes the activations) are what this
    measures; the teacher-forced count runs the prefill's many-row products."""
    same = total = 0
    cached: list[int] = []
    for t in ref_turns:
        prompt, reply = t["prompt_ids"], t["reply_ids"]
        if not reply:
            continue
        keep = 0  # the reused prefix (the earlier turns), minus one token so the prompt's last logits are computed
        while keep < min(len(cached), len(prompt) - 1) and cached[keep] == prompt[keep]:
            keep += 1
        backend.truncate(keep)
        logits = backend.forward(prompt[keep:])
        for tok in reply:
            same += int(int(logits.argmax()) == tok)
            total += 1
            logits = backend.forward([tok])
        cached = prompt + reply
    backend.truncate(0)
    return same, total


def worker(label: str, model: str | None, turns: list[str], max_new_tokens: int, threads: int | None, ref_path: str | None) -> dict:
    import psutil

    from fmchat.config import RunConfig
    from fmchat.conversation import Conversation

    quant, dtype = ROWS[label]
    config = RunConfig(model=model, device="cpu", dtype=dtype, quant=quant, threads=threads, max_new_tokens=max_new_tokens,
                       temperature=0.0, seed=0, compile="eager")  # fmt: skip (each scheme's own products, no compile beside)
    t0 = time.perf_counter()
    chat = Conversation.open(config, save=False)
    load_s = time.perf_counter() - t0
    backend, session = chat.backend, chat.session
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    qr = backend.quant_report
    ppl, ppl_tokens = perplexity(backend, TEXT.read_text(encoding="utf-8"))
    session.run_turn("Hi.")  # warm-up, not counted
    session.reset()
    conv, gen_tokens, decode_s = [], 0, 0.0
    for text in turns:
        done = session.run_turn(text)
        s = done.stats
        reply = list(session.messages[-1].token_ids)
        prompt = backend.render(session.template_messages()[:-1])
        conv.append({"prompt_ids": prompt, "reply_ids": reply})
        if s.decode_tok_s and s.generated_tokens > 1:
            gen_tokens += s.generated_tokens - 1
            decode_s += (s.generated_tokens - 1) / s.decode_tok_s
    out = {
        "scheme": label,
        "quant": quant,
        "dtype": backend.dtype,
        "threads": threads,
        "weights_bytes": backend.weights_bytes(),
        "load_s": round(load_s, 2),
        "rss_loaded_mib": round(rss_loaded, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "decode_tok_s": round(gen_tokens / decode_s, 2) if decode_s else None,
        "decode_tokens": gen_tokens,
        "perplexity": round(ppl, 4),
        "ppl_tokens": ppl_tokens,
        "quantized_layers": len(qr.quantized) if qr else 0,
        "kept_layers": qr.skipped if qr else [],
        "embedding": next((q for q in qr.quantized if "embed" in q), None) if qr else None,
        "decode_path": backend.decode_path,
        "kernels": report.kernel_choices(),  # chosen at this worker's load: the parent loads no model
        "conversation": conv,
    }
    if ref_path:
        ref = json.loads(Path(ref_path).read_text())
        same, total = teacher_forced_agreement(backend, ref["conversation"])
        out["agree_tokens"], out["agree_total"] = same, total
        out["step_agree_tokens"], out["step_agree_total"] = decode_step_agreement(backend, ref["conversation"])
        out["identical_replies"] = sum(a["reply_ids"] == b["reply_ids"] for a, b in zip(conv, ref["conversation"]))
    return out


def _run_worker(label, model, turns, max_new_tokens, threads, ref_path, tmp: Path, log) -> dict:
    args = [sys.executable, "-m", "fmchat.bench.quant", label, "--turns-json", json.dumps(turns),
            "--max-new-tokens", str(max_new_tokens), "--out", str(tmp / f"{label}.json")]  # fmt: skip
    if model:
        args += ["--model", model]
    if threads:
        args += ["--threads", str(threads)]
    if ref_path:
        args += ["--ref", str(ref_path)]
    log(f"[bench] {label}: loading, perplexity, {len(turns)} turns")
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {label} failed:\n{proc.stderr[-3000:]}")
    return json.loads((tmp / f"{label}.json").read_text())


def bench_quant(model: str | None, turns: list[str], *, schemes=tuple(ROWS), max_new_tokens: int = 48,
                threads: int | None = None, json_out: bool = False) -> dict:  # fmt: skip
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    run = report.begin("bench quant")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fmchat-bench-quant-") as d:
        tmp = Path(d)
        rows[REFERENCE] = _run_worker(REFERENCE, model, turns, max_new_tokens, threads, None, tmp, log)
        ref_path = tmp / f"{REFERENCE}.json"
        for label in schemes:
            if label != REFERENCE:
                rows[label] = _run_worker(label, model, turns, max_new_tokens, threads, ref_path, tmp, log)
        for what in ("agree", "step_agree"):
            rows[REFERENCE][f"{what}_tokens"] = rows[REFERENCE][f"{what}_total"] = None
        rows[REFERENCE]["identical_replies"] = len(turns)
    for r in rows.values():
        r.pop("conversation", None)
    result = {"model": model or "default", "turns": len(turns), "max_new_tokens": max_new_tokens, "threads": threads,
              "ppl_text": TEXT.name, "reference": REFERENCE, "schemes": list(rows.values())}  # fmt: skip
    if "int8" in rows and "bf16" in rows:
        a, b = rows["int8"], rows["bf16"]
        result["int8_vs_bf16"] = {
            "weights_ratio": round(a["weights_bytes"] / b["weights_bytes"], 4),
            "perplexity_ratio": round(a["perplexity"] / b["perplexity"], 4),
            "decode_speed_ratio": round(a["decode_tok_s"] / b["decode_tok_s"], 3) if a["decode_tok_s"] and b["decode_tok_s"] else None,
        }
    from fmchat.backends.base import default_threads

    # the schemes ran in worker processes, each with set_threads(threads): one per physical core when None
    return report.emit(run, result, json_out, lambda: print_tables(result, rows, turns), threads=threads or default_threads(),
                       decode_path=report.decode_paths({k: r["decode_path"] for k, r in rows.items()}),
                       kernels={k: r["kernels"] for k, r in rows.items()})  # fmt: skip


def _share(r: dict, what: str) -> str:
    """``agree`` or ``step_agree`` of a row as ``96.8% (604/624)``; n/a without reply tokens to compare."""
    same, total = r.get(f"{what}_tokens"), r.get(f"{what}_total")
    return f"{same / total:.1%} ({same}/{total})" if total else "n/a"


def print_tables(result: dict, rows: dict, turns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fmchat bench quant · {result['model']} · cpu · threads {result['threads'] or 'default'} · "
                  f"{len(turns)} turns × ≤{result['max_new_tokens']} tokens · ppl on {TEXT.name}")  # fmt: skip
    for col in ("scheme", "weights MiB", "vs bf16", "RSS loaded MiB", "peak RSS MiB", "decode tok/s", "perplexity",
                "top-1 agree vs fp32", "same, decode steps", "same replies"):  # fmt: skip
        table.add_column(col, justify="right")
    bf = rows.get("bf16", rows[REFERENCE])
    for r in rows.values():
        agree, step = (_share(r, "agree"), _share(r, "step_agree")) if r["scheme"] != REFERENCE else ("reference",) * 2
        table.add_row(
            r["scheme"], f"{r['weights_bytes'] / 2**20:.1f}", f"{r['weights_bytes'] / bf['weights_bytes']:.3f}",
            f"{r['rss_loaded_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
            f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "n/a", f"{r['perplexity']:.3f}", agree, step,
            f"{r['identical_replies']}/{len(turns)}",
        )  # fmt: skip
    console = Console(highlight=False, width=160)
    console.print(table)
    console.print(f"perplexity over {rows[REFERENCE]['ppl_tokens']} tokens in windows of {WINDOW}; decode tok/s over "
                  f"{rows[REFERENCE]['decode_tokens']} fp32 decode steps (each scheme its own greedy replies)")  # fmt: skip
    if "int8_vs_bf16" in result:
        x = result["int8_vs_bf16"]
        console.print(f"int8 vs bf16: weights {x['weights_ratio']:.3f}x, perplexity {x['perplexity_ratio']:.4f}x, "
                      f"decode speed {x['decode_speed_ratio']}x")  # fmt: skip
    q = rows.get("int8")
    if q:
        console.print(f"quantized (int8): {q['quantized_layers']} layers incl. {q['embedding']}; kept: {q['kept_layers'] or 'none'}")


def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fmchat.bench.quant", description="one scheme of fmchat bench quant")
    p.add_argument("scheme", choices=list(ROWS))
    p.add_argument("--model")
    p.add_argument("--turns-json", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int)
    p.add_argument("--ref")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    res = worker(a.scheme, a.model, json.loads(a.turns_json), a.max_new_tokens, a.threads, a.ref)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main(sys.argv[1:])

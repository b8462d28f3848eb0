"""`fmchat bench decode`: decode tok/s at several context lengths, side by side in one process.

Rows (each on the same model, same prompt tokens, same machine, same run):

* ``generate()``  transformers' own ``model.generate`` (greedy, DynamicCache, sdpa): the old baseline.
  Decode rate = N / (time of generate(N + 1 new tokens) - time of generate(1 new token)).
* ``eager``  fmchat's own loop (``backend.forward`` one token at a time, argmax, one host sync per token).
* ``compiled`` / ``compiled+int8`` / ``compiled+int4``  the same loop with ``--compile compiled`` (and ``--quant``): the
  step the default decode path (``auto``) switches to once it is ready, compiled at load here (or loaded from the
  compile cache) so that every timed token uses it.
* ``llama.cpp``  the llama.cpp backend on the GGUF file (its own quantization, e.g. Q4_1), same loop.

For each row and context C: the cache is emptied, C prompt tokens are prefilled (chunks of 512, as a chat
turn does), then N tokens are decoded greedily and timed; tok/s = N / elapsed. TTFT: empty cache, prefill
``ttft_tokens`` tokens, sample the first token. Rounds run every row in turn (so a burst of load from other
processes hits every row alike) and the best round per cell is kept.

Bandwidth bound: a decode step reads every weight once, so tok/s <= read rate / weights bytes. The read rate
is measured here (the best of several ``sum`` passes over a buffer far larger than the caches).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from . import report

COLUMNS = ("config", "backend", "dtype", "quant", "decode_path", "weights_bytes", "bound_tok_s", "decode_tok_s", "ttft_ms")
CONFIGS = ("generate()", "eager", "compiled", "compiled+int8", "compiled+int4", "llama.cpp")
TRANSFORMERS = {  # label -> RunConfig fields
    "eager": {"compile": "eager"},
    "compiled": {"compile": "compiled"},  # what the default decode path (auto) runs once its step is ready
    "compiled+int8": {"compile": "compiled", "quant": "int8"},
    "compiled+int4": {"compile": "compiled", "quant": "int4"},
}
PREFILL_CHUNK = 512
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-3.txt"


def log(msg: str) -> None:
    print(f"[bench decode] {msg}", file=sys.stderr, flush=True)


def read_rate_gb_s(mb: int = 512, repeats: int = 5) -> float:
    """Memory read rate (GB/s): the best of ``repeats`` full sums over an ``mb`` MiB float32 buffer."""
    x = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _prefill(backend, ids):
    logits = None
    for s in range(0, len(ids), PREFILL_CHUNK):
        logits = backend.forward(ids[s : s + PREFILL_CHUNK])
    return logits


@torch.inference_mode()
def decode_rate(backend, ids: list[int], n: int) -> float:
    backend.truncate(0)
    logits = _prefill(backend, ids)
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(torch.argmax(torch.as_tensor(logits)))  # the one host sync per token, as in a chat turn
        logits = backend.forward([token])
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def ttft_ms(backend, ids: list[int]) -> float:
    backend.truncate(0)
    t0 = time.perf_counter()
    logits = _prefill(backend, ids)
    int(torch.argmax(torch.as_tensor(logits)))
    return (time.perf_counter() - t0) * 1000


@torch.inference_mode()
def generate_rate(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids], device=model.device)
    kw = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "attention_mask": torch.ones_like(x)}

    def timed(k: int) -> float:
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t0

    return n / max(timed(n + 1) - timed(1), 1e-9)


@torch.inference_mode()
def generate_ttft_ms(model, ids: list[int]) -> float:
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, do_sample=False, temperature=None, top_p=None, top_k=None, attention_mask=torch.ones_like(x))
    return (time.perf_counter() - t0) * 1000


def bench_decode(
    model: str | None = None,
    *,
    contexts: list[int] = (128, 1024, 4096),
    new_tokens: int = 32,
    ttft_tokens: int = 1024,
    configs: list[str] = CONFIGS,
    llamacpp_model: str | None = "same",
    dtype: str = "bfloat16",
    device: str = "cpu",
    rounds: int = 1,
    threads: int | None = None,
    read_mb: int = 512,
    json_out: bool = False,
    extra_configs: dict[str, dict] | None = None,
    quiet: bool = False,
) -> dict:
    """Run the table; ``configs`` picks rows (``llama.cpp`` needs a GGUF model, skipped when ``llamacpp_model`` is None).
    ``extra_configs``: more transformers rows, label -> RunConfig fields. ``quiet``: return without printing."""
    from fmchat.backends.transformers.fmc import attention_shape
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend
    from fmchat.engine.session import set_threads

    run = None if quiet else report.begin("bench decode")
    set_threads(threads)
    contexts = sorted({int(c) for c in contexts})
    ctx = max(max(contexts), ttft_tokens) + new_tokens + 8
    gbs = read_rate_gb_s(read_mb)
    log(f"memory read rate {gbs:.1f} GB/s ({torch.get_num_threads()} threads); load {os.getloadavg()[0]:.2f}")
    rows: dict[str, dict] = {}
    loaded: dict[str, object] = {}
    for label in configs:
        if label == "generate()":
            continue
        if label == "llama.cpp":
            if llamacpp_model is None:
                continue
            spec = model if llamacpp_model == "same" else llamacpp_model
            cfg = RunConfig(model=spec, backend="llamacpp", device=device, ctx=ctx, threads=threads or torch.get_num_threads())
            b = load_backend(cfg, lambda s, f=None, lb=label: log(f"{lb}: {s}"))
        else:
            fields = {**TRANSFORMERS, **(extra_configs or {})}[label]
            cfg = RunConfig(model=model, device=device, dtype=dtype, ctx=ctx, threads=threads, **fields)
            t0 = time.perf_counter()
            b = load_backend(cfg, lambda s, f=None, lb=label: log(f"{lb}: {s}"))
            log(f"{label}: loaded in {time.perf_counter() - t0:.1f} s ({b.decode_path})")
        loaded[label] = b
    first_tf = next((b for lb, b in loaded.items() if lb != "llama.cpp"), None)
    if first_tf is None:
        raise ValueError("bench decode needs at least one transformers row")
    ids = prompt_ids(first_tf.tokenizer, max(max(contexts), ttft_tokens))
    order = [lb for lb in configs if lb in loaded or lb == "generate()"]
    gen_model = None
    if "generate()" in order:
        eager = loaded.get("eager")
        if eager is not None and eager.kernel == "sdpa" and eager.quant == "none":
            gen_model = eager.model  # generate() keeps its own DynamicCache; the backend's cache is untouched
        else:
            gen_model = load_backend(RunConfig(model=model, device=device, dtype=dtype, ctx=ctx, threads=threads,
                                               compile="eager")).model  # fmt: skip
    for lb in order:
        b = loaded.get(lb)
        weights = b.weights_bytes() if b is not None else sum(
            t.numel() * t.element_size() for t in {id(p): p for p in gen_model.parameters()}.values())  # fmt: skip
        rows[lb] = {
            "config": lb,
            "backend": b.name if b is not None else "transformers",
            "dtype": b.dtype if b is not None else str(gen_model.dtype).removeprefix("torch."),
            "quant": b.quant if b is not None else "none",
            "decode_path": b.decode_path if b is not None else "generate()",
            "weights_bytes": int(weights),
            "bound_tok_s": round(gbs * 1e9 / weights, 1),
            "decode_tok_s": {},
            "ttft_ms": None,
        }
    for lb in order:  # warm-up: allocators, oneDNN primitives, llama.cpp graphs
        b = loaded.get(lb)
        if b is not None:
            decode_rate(b, ids[: min(contexts)], 4)
        else:
            generate_rate(gen_model, ids[: min(contexts)], 2)
    for r in range(rounds):
        for c in contexts:
            for lb in order:
                b = loaded.get(lb)
                rate = decode_rate(b, ids[:c], new_tokens) if b is not None else generate_rate(gen_model, ids[:c], new_tokens)
                cell = rows[lb]["decode_tok_s"]
                cell[str(c)] = round(max(cell.get(str(c), 0.0), rate), 1)
                log(f"round {r + 1} ctx {c:>5} {lb:<14} {rate:7.1f} tok/s (load {os.getloadavg()[0]:.2f})")
        for lb in order:
            b = loaded.get(lb)
            t = ttft_ms(b, ids[:ttft_tokens]) if b is not None else generate_ttft_ms(gen_model, ids[:ttft_tokens])
            prev = rows[lb]["ttft_ms"]
            rows[lb]["ttft_ms"] = round(t if prev is None else min(prev, t), 1)
    for b in loaded.values():
        b.truncate(0)
    result = {
        "model": first_tf.model_name,
        "device": device,
        "threads": torch.get_num_threads(),
        "contexts": contexts,
        "new_tokens": new_tokens,
        "ttft_tokens": ttft_tokens,
        "rounds": rounds,
        "read_gb_s": round(gbs, 1),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "rows": list(rows.values()),
        "attention_shape": attention_shape(first_tf.model.config),
    }
    if quiet:
        return result
    paths = report.decode_paths({r["config"]: r["decode_path"] for r in rows.values()})
    return report.emit(run, result, json_out, lambda: print_table(result), decode_path=paths)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from fmchat.engine.stats import fmt_bytes

    t = Table(title=f"fmchat bench decode · {result['model']} · {result['device']} · {result['threads']} threads · "
                    f"read {result['read_gb_s']} GB/s · {result['new_tokens']} tokens per cell, best of {result['rounds']}")  # fmt: skip
    for col in ("config", "weights", "quant", "path"):
        t.add_column(col)
    for c in result["contexts"]:
        t.add_column(f"tok/s @{c}", justify="right")
    t.add_column("bound tok/s", justify="right")
    t.add_column(f"TTFT {result['ttft_tokens']} (ms)", justify="right")
    for r in result["rows"]:
        t.add_row(r["config"], fmt_bytes(r["weights_bytes"]), r["quant"], r["decode_path"],
                  *[report.num(r["decode_tok_s"].get(str(c)), ".1f") for c in result["contexts"]],
                  f"{r['bound_tok_s']:.0f}", report.num(r["ttft_ms"], ".0f"))  # fmt: skip
    Console(highlight=False, width=200).print(t)

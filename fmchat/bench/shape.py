"""`fmchat bench shape NAME`: what a model of a given shape costs on this machine, without its weights.

NAME is an alias whose ``config.json`` ships in ``fmchat/shapes/`` (hyperparameters only) or the path of any
``config.json``. The bench generates random bfloat16 weights with exactly that architecture once
(``shape_weights``), and a Q8_0 GGUF of the same random weights for llama.cpp (``shape_gguf``). Then each row
runs in a fresh process of its own, so one row's memory never hides another's:

* one row per ``--quant`` (transformers, through the public path: ``load_backend(RunConfig(model=<dir>,
  quant=..., device="cpu"))``), and
* llama.cpp on the Q8_0 GGUF (``load_backend(RunConfig(model=<gguf>, backend="llamacpp"))``); if llama.cpp
  refuses the architecture, a Llama model of the same size instead, and the report says so.

Per row (transformers): the weight kernels, chosen by measuring on this machine (``fmchat_kernels.quant.select``, cached
in ``kernel_choices.json`` under fmchat's cache folder; ``FMCHAT_KERNEL_SELECT=off`` keeps the defaults, for an A/B),
printed in the header. Per row: load time (``load_backend``'s wall time; the libraries are imported before the clock starts), peak RSS
during the load and over the whole run (the process's ``VmHWM``: its own high-water mark, which a parent's memory
cannot inflate), weights bytes (``backend.weights_bytes()``), KV bytes per token (transformers: the cache's bytes
over its tokens after the TTFT prefill; llama.cpp: its f16 cache, allocated for the whole window, over the window),
TTFT (prefill ``--ttft-tokens`` prompt tokens in chunks of 512, as a chat turn does, then pick the first token) and
decode tok/s at each ``--contexts`` length (prefill that many tokens, then decode ``--new-tokens`` tokens greedily one
``backend.forward`` at a time, timed). Prompts are random token ids below the model's vocabulary size, fed directly.
A short warm-up (8 tokens, 2 steps) runs first and is not counted in TTFT or tok/s; its time is reported, because
llama.cpp maps the GGUF and reads the weights only then (its load time leaves that out).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from importlib import resources
from pathlib import Path

from . import report

DEFAULT_QUANTS = ("bf16", "int8", "int4", "log8")
PREFILL_CHUNK = 512
SOURCE_KEY = "_fmchat_source"
LLAMACPP = "llama.cpp Q8_0"
COUNTED = re.compile(r"(\d+)/(\d+)\b")


def log(msg: str) -> None:
    print(f"[bench shape] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- which shape
def aliases() -> dict[str, Path]:
    """Alias -> its shipped config (fmchat/shapes/*.json)."""
    root = resources.files("fmchat") / "shapes"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")}


def resolve(name: str) -> tuple[str, dict, str]:
    """(label, config, where it came from) for an alias or a config.json path; ValueError (one line) otherwise."""
    known = aliases()
    path = known.get(name)
    label = name
    if path is None:
        p = Path(os.path.expanduser(name))
        if p.is_dir() and (p / "config.json").is_file():
            p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"unknown shape '{name}': not an alias ({', '.join(known)}) and not a config.json file")
        path, label = p, (p.parent.name if p.name == "config.json" else p.stem)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"shape '{name}': {path} is not a readable JSON file ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"shape '{name}': {path} is not a model config.json (no model_type); aliases: {', '.join(known)}")
    source = config.pop(SOURCE_KEY, None) or str(path)
    return label, config, source


def text_config(config: dict) -> dict:
    return dict(config.get("text_config") or {}) or config


def describe(config: dict) -> dict:
    """The architecture's numbers, and the KV bytes per token they imply (bfloat16 K and V)."""
    from .shape_gguf import Dims

    d = Dims.of(config)
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": d.arch,
        "layers": d.layers,
        "hidden": d.hidden,
        "ffn": d.ffn,
        "heads": d.heads,
        "kv_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "vocab": d.vocab,
        "tied_embeddings": d.tied,
        "max_position_embeddings": d.ctx,
        "kv_bytes_per_token_bf16": kv_bytes_per_token(config, 2),
    }


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv heads x head dim x bytes per value."""
    from .shape_gguf import Dims

    d = Dims.of(config)
    return 2 * d.layers * d.kv_heads * d.head_dim * dtype_bytes


# ---------------------------------------------------------------- one row, in its own process
def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak resident set (bytes): ``VmHWM`` (the high-water mark of this process image only), else
    ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """``n`` random token ids in [3, vocab): the same for every row."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def _throttled(say):
    """A load-progress callback that passes every step but only about every tenth of a counted one ("3/290 tensors")."""
    last: dict[str, int] = {}

    def progress(step: str, fraction: float | None = None) -> None:
        m = COUNTED.search(step)
        if m:
            n, total = int(m.group(1)), int(m.group(2))
            key = step[: m.start()]
            bucket = n * 10 // max(total, 1)
            if n != total and last.get(key) == bucket:
                return
            last[key] = bucket
        say(step)

    return progress


def worker(args: dict) -> dict:
    """Load one row through the public path and measure it. ``args``: kind (transformers | llamacpp), model, quant,
    ctx, threads, vocab, ttft_tokens, contexts, new_tokens, label."""
    import torch

    label = args["label"]

    def say(msg: str) -> None:
        log(f"{label}: {msg}")

    if args["kind"] == "llamacpp":
        import llama_cpp  # noqa: F401 - imported before the clock starts
    else:  # transformers and the model's own modeling module, imported before the clock starts
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from fmchat.backends.transformers.gguf import quiet_transformers

        quiet_transformers()
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(args["model"]))]

    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    rss_before = _rss_now()
    if args["kind"] == "llamacpp":
        cfg = RunConfig(model=args["model"], backend="llamacpp", device="cpu", ctx=args["ctx"], threads=args["threads"])
    else:
        # the decode path is explicit: "auto" would start a background compile in the middle of the timings
        cfg = RunConfig(model=args["model"], quant=args["quant"], device="cpu", ctx=args["ctx"], threads=args["threads"],
                        compile=args.get("compile", "eager"))  # fmt: skip
    say(f"loading {Path(args['model']).name} (fresh process, RSS {rss_before / 2**20:.0f} MiB before)")
    t0 = time.perf_counter()
    backend = load_backend(cfg, _throttled(say))
    load_s = time.perf_counter() - t0
    peak_load = peak_rss()
    rss_loaded = _rss_now()
    say(f"loaded in {load_s:.1f} s; peak RSS {peak_load / 2**30:.2f} GiB during load")
    kernels = None
    if args["kind"] != "llamacpp":  # chosen by the load (measured on this machine, or read from its cache)
        kernels = report.kernel_choices()

    def prefill(ids: list[int]):
        logits = None
        for s in range(0, len(ids), PREFILL_CHUNK):
            logits = backend.forward(ids[s : s + PREFILL_CHUNK])
        return logits

    longest = max([args["ttft_tokens"], *args["contexts"]])
    ids = prompt_ids(args["vocab"], longest)
    with torch.inference_mode():
        backend.truncate(0)
        t0 = time.perf_counter()
        logits = prefill(ids[:8])
        for _ in range(2):
            logits = backend.forward([int(torch.argmax(torch.as_tensor(logits)))])
        warmup_s = time.perf_counter() - t0
        say(f"warm-up done (8 tokens, 2 steps) in {warmup_s:.1f} s")
        backend.truncate(0)
        t0 = time.perf_counter()
        int(torch.argmax(torch.as_tensor(prefill(ids[: args["ttft_tokens"]]))))
        ttft_ms = (time.perf_counter() - t0) * 1000
        cached = backend.cached_tokens()
        kv = backend.kv_used_bytes()  # the bytes holding cached positions (fmc and llama.cpp allocate the window)
        kv_per_token = kv / cached if kv is not None and cached else None
        say(f"TTFT {args['ttft_tokens']} tokens: {ttft_ms:.0f} ms; KV {report.num(kv_per_token, '.0f')} B/token")
        rates = {}
        for c in args["contexts"]:
            backend.truncate(0)
            logits = prefill(ids[:c])
            n = args["new_tokens"]
            t0 = time.perf_counter()
            for _ in range(n):
                logits = backend.forward([int(torch.argmax(torch.as_tensor(logits)))])
            rate = n / (time.perf_counter() - t0)
            rates[str(c)] = round(rate, 2)
            say(f"decode @{c}: {n} tokens at {rate:.2f} tok/s")
        backend.truncate(0)
    out = {
        "row": label,
        "kind": args["kind"],
        "backend": backend.name,
        "quant": backend.quant if args["kind"] != "llamacpp" else "Q8_0",
        "dtype": backend.dtype,
        "decode_path": backend.decode_path if args["kind"] != "llamacpp" else "llama.cpp (llama_decode)",
        "threads": torch.get_num_threads() if args["kind"] != "llamacpp" else args["threads"],
        "weights_bytes": backend.weights_bytes(),
        "kv_bytes_per_token": round(kv_per_token) if kv_per_token is not None else None,
        "load_s": round(load_s, 2),
        # loading.py: "mapped", "streamed", "stored", ... (llama.cpp maps its file: nothing to say)
        "weights_load": backend.weights_load if args["kind"] != "llamacpp" else None,
        "warmup_s": round(warmup_s, 2),
        "rss_before_load_bytes": rss_before,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_load_bytes": peak_load,
        "peak_rss_bytes": peak_rss(),
        "ttft_ms": round(ttft_ms, 1),
        "decode_tok_s": rates,
        "kernels": kernels,
    }
    backend.close()
    return out


def _run_row(args: dict, tmp: Path) -> tuple[dict | None, str]:
    """Run one row in a fresh interpreter; its progress streams through to stderr. (result, error tail)."""
    out = tmp / f"{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, "-m", "fmchat.bench.shape", json.dumps(args), str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            if line.startswith("[bench shape]"):
                print(line, end="", file=sys.stderr, flush=True)
        rc = proc.wait()
    if rc != 0 or not out.is_file():
        return None, "\n".join(tail)
    return json.loads(out.read_text()), ""


# ---------------------------------------------------------------- the bench
def bench_shape(name: str, *, quants=DEFAULT_QUANTS, llamacpp: bool = True, ttft_tokens: int = 512,
                contexts=(128, 1024), new_tokens: int = 16, threads: int | None = None, json_out: bool = False,
                compile: str = "eager") -> dict:  # fmt: skip
    """Measure every row; raise ValueError (one line) for a bad name, RuntimeError when a row fails."""
    from fmchat.backends.base import default_threads

    from .shape_gguf import write_gguf
    from .shape_weights import ensure_weights

    label, config, source = resolve(name)
    run = report.begin("bench shape")
    threads = threads or default_threads()
    contexts = sorted({int(c) for c in contexts})
    shape = describe(config)
    if ttft_tokens + new_tokens > shape["max_position_embeddings"] or max(contexts) + new_tokens > shape["max_position_embeddings"]:
        raise ValueError(f"shape '{label}': its window is {shape['max_position_embeddings']} tokens, shorter than the "
                         f"prompts asked for (--ttft-tokens, --contexts + --new-tokens)")  # fmt: skip
    ctx = max(ttft_tokens, *contexts) + new_tokens + 8
    log(f"shape {label}: {shape['architecture']}, {shape['layers']} layers, hidden {shape['hidden']}, "
        f"vocab {shape['vocab']} ({source})")  # fmt: skip
    t0 = time.perf_counter()
    weights, gen = ensure_weights(config, log)
    gen["wall_s"] = round(time.perf_counter() - t0, 1)
    common = {"ctx": ctx, "threads": threads, "vocab": shape["vocab"], "ttft_tokens": ttft_tokens,
              "contexts": contexts, "new_tokens": new_tokens, "compile": compile}  # fmt: skip
    rows: list[dict] = []
    steps: dict = {"weights": gen}
    llama_note = None
    with tempfile.TemporaryDirectory(prefix="fmchat-bench-shape-") as d:
        tmp = Path(d)
        for q in quants:
            log(f"{q}: fresh process")
            row, err = _run_row({**common, "kind": "transformers", "model": str(weights), "quant": q, "label": q}, tmp)
            if row is None:
                raise RuntimeError(f"bench shape: the {q} row failed:\n{err}")
            rows.append(row)
        if llamacpp:
            t0 = time.perf_counter()
            gguf, info = write_gguf(weights, config, log)
            steps["gguf"] = {**info, "wall_s": round(time.perf_counter() - t0, 1)}
            if info["as_llama"]:
                llama_note = f"llama.cpp row: a Llama model of the same size ({shape['model_type']} is not written natively)"
            log(f"{LLAMACPP}: fresh process")
            row, err = _run_row({**common, "kind": "llamacpp", "model": str(gguf), "quant": "Q8_0", "label": LLAMACPP}, tmp)
            if row is None and not info["as_llama"] and "could not load" in err:  # refused at load: not a crash later
                why = _last_error(err)
                log(f"{LLAMACPP}: llama.cpp could not run the {shape['model_type']} GGUF ({why}); using a Llama model of the same size")
                t0 = time.perf_counter()
                gguf, info = write_gguf(weights, config, log, as_llama=True)
                steps["gguf_as_llama"] = {**info, "wall_s": round(time.perf_counter() - t0, 1)}
                llama_note = f"llama.cpp row: a Llama model of the same size (llama.cpp refused {shape['model_type']}: {why})"
                row, err = _run_row({**common, "kind": "llamacpp", "model": str(gguf), "quant": "Q8_0", "label": LLAMACPP}, tmp)
            if row is None:
                raise RuntimeError(f"bench shape: the llama.cpp row failed:\n{err}")
            row["gguf"] = str(gguf)
            row["as_llama"] = bool(info["as_llama"])
            rows.append(row)
    ref = next((r for r in rows if r["kind"] == "llamacpp"), None)
    result = {
        "shape": label,
        "source": source,
        "random_weights": True,
        "weights_dir": str(weights),
        "config": shape,
        "threads": threads,
        "ttft_tokens": ttft_tokens,
        "contexts": contexts,
        "new_tokens": new_tokens,
        "prefill_chunk": PREFILL_CHUNK,
        "steps": steps,
        "llamacpp_note": llama_note,
        "rows": rows,
        "vs_llamacpp": [ratios(r, ref, contexts) for r in rows if r is not ref] if ref else [],
    }
    paths = report.decode_paths({r["row"]: r["decode_path"] for r in rows})
    kernels = {r["row"]: r.get("kernels") for r in rows if r["kind"] != "llamacpp"}
    return report.emit(run, result, json_out, lambda: print_tables(result), threads=threads, decode_path=paths,
                       kernels=kernels)  # fmt: skip


def _last_error(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip() and not ln.startswith("[bench shape]")]
    return (lines[-1] if lines else "no message")[:200]


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(row: dict, ref: dict, contexts) -> dict:
    """Row / llama.cpp for each figure (> 1: bigger or slower for sizes and times, faster for tok/s)."""
    return {
        "row": row["row"],
        "weights": _ratio(row["weights_bytes"], ref["weights_bytes"]),
        "peak_rss": _ratio(row["peak_rss_bytes"], ref["peak_rss_bytes"]),
        "load_s": _ratio(row["load_s"], ref["load_s"]),
        "ttft_ms": _ratio(row["ttft_ms"], ref["ttft_ms"]),
        "decode_tok_s": {str(c): _ratio(row["decode_tok_s"].get(str(c)), ref["decode_tok_s"].get(str(c))) for c in contexts},
    }


def _step_text(key: str, info: dict) -> str:
    what = {"weights": "random weights", "gguf": "GGUF Q8_0", "gguf_as_llama": "GGUF Q8_0 (as llama)"}.get(key, key)
    if info.get("cached"):
        return f"{what} cached"
    return f"{what} {'generated' if key == 'weights' else 'written'} in {info.get('seconds')} s"


def _mib_range(values: list[int]) -> str:
    lo, hi = min(values) / 2**20, max(values) / 2**20
    return f"{lo:.0f} MiB" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f} MiB"


def _gib(n) -> str:
    return report.NA if n is None else f"{n / 2**30:.2f} GiB"


def _x(v) -> str:
    return report.NA if v is None else f"{v:.2f}x"


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from fmchat.engine.stats import fmt_bytes

    s = result["config"]
    console = Console(highlight=False, width=200)
    console.print(f"shape    {result['shape']} · {s['architecture']} · {s['layers']} layers · hidden {s['hidden']} · "
                  f"ffn {s['ffn']} · {s['heads']} heads / {s['kv_heads']} kv heads × {s['head_dim']} · vocab {s['vocab']}"
                  f"{' (tied)' if s['tied_embeddings'] else ''}", markup=False, soft_wrap=True)  # fmt: skip
    console.print(f"weights  random weights (bf16 safetensors generated from the config, not the model's own; the speed "
                  f"and memory carry over, quality does not) · config from {result['source']}", markup=False, soft_wrap=True)  # fmt: skip
    console.print("steps    " + " · ".join(_step_text(k, v) for k, v in result["steps"].items()), markup=False, soft_wrap=True)
    console.print()
    ctxs = result["contexts"]
    t = Table(title=f"fmchat bench shape · {result['shape']} · random weights · cpu · {result['threads']} threads · "
                    f"TTFT over {result['ttft_tokens']} prompt tokens · decode {result['new_tokens']} tokens after a prefill of each context")  # fmt: skip
    for col in ("row", "weights", "KV / token", "load (s)", "warm-up (s)", "peak RSS load", "peak RSS"):
        t.add_column(col, justify="right" if col != "row" else "left")
    t.add_column(f"TTFT {result['ttft_tokens']} (ms)", justify="right")
    for c in ctxs:
        t.add_column(f"tok/s @{c}", justify="right")
    t.add_column("decode path")
    for r in result["rows"]:
        t.add_row(r["row"] + (" (as llama)" if r.get("as_llama") else ""), fmt_bytes(r["weights_bytes"]),
                  report.num(r["kv_bytes_per_token"], ",") + (" B" if r["kv_bytes_per_token"] is not None else ""),
                  report.num(r["load_s"], ".2f") + (f" {r['weights_load']}" if r.get("weights_load") else ""),
                  report.num(r.get("warmup_s"), ".2f"), _gib(r["peak_rss_load_bytes"]),
                  _gib(r["peak_rss_bytes"]),
                  report.num(r["ttft_ms"], ".0f"), *[report.num(r["decode_tok_s"].get(str(c)), ".2f") for c in ctxs],
                  r["decode_path"])  # fmt: skip
    console.print(t)
    if result["vs_llamacpp"]:
        v = Table(title=f"vs {LLAMACPP} on the same random weights (row ÷ llama.cpp)")
        for col in ("row", "weights", "peak RSS", "load", "TTFT", *[f"tok/s @{c}" for c in ctxs]):
            v.add_column(col, justify="right" if col != "row" else "left")
        for x in result["vs_llamacpp"]:
            v.add_row(x["row"], _x(x["weights"]), _x(x["peak_rss"]), _x(x["load_s"]), _x(x["ttft_ms"]),
                      *[_x(x["decode_tok_s"].get(str(c))) for c in ctxs])  # fmt: skip
        console.print(v)
    kv = (f"KV / token: bfloat16 K and V = 2 × {s['layers']} layers × {s['kv_heads']} kv heads × {s['head_dim']} × 2 B = "
          f"{s['kv_bytes_per_token_bf16']:,} B; llama.cpp: its f16 cache (both: the bytes per cached position, whatever is allocated for the window)")  # fmt: skip
    rss = (f"peak RSS: the row's own process (VmHWM), during the load and over the whole run, including the interpreter "
           f"and torch ({_mib_range([r['rss_before_load_bytes'] for r in result['rows']])} before the load); "
           f"load: load_backend() wall time, libraries already imported; how the weights arrived: mapped (the file's "
           f"pages), streamed (converted or quantized as read; an integer scheme's codes are then kept), stored (the "
           f"codes an earlier load kept, mapped)")  # fmt: skip
    notes = [kv, rss]
    notes.append("warm-up: the first 8 tokens and 2 steps after the load, not counted in TTFT or tok/s; a backend that "
                 "maps its weights file (llama.cpp always) reads the weights then, not during the load")  # fmt: skip
    if result["llamacpp_note"]:
        notes.append(result["llamacpp_note"])
    for n in notes:
        console.print(n, markup=False, soft_wrap=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _res = worker(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(_res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is on disk: skip tearing down torch's and llama.cpp's threads (seconds on a busy machine)

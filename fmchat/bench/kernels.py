"""`fmchat bench kernels`: the attention kernels side by side, in one process.

Two tables:

* **Decode attention** (``fmchat_kernels.attention.bench.decode_attention_bench``): milliseconds for one layer's attention
  of one decoded token, at each context length, with the loaded model's head layout and dtype. Rows: ``sdpa``
  (PyTorch SDPA over K/V cut to the length, as transformers' sdpa path gets them), ``eager`` (transformers' own
  ``eager_attention_forward``: repeat_kv, matmul, fp32 softmax), ``fmc`` (fmchat's kernel as the chat's eager loop
  calls it: on CPU the PyTorch path on a buffer preallocated to the largest length, told the fill; Triton on
  CUDA), ``fmc-ragged`` (CPU, the general path for rows of different lengths) and ``fmc-fused`` (CPU: the fused
  loop the compiled decode step traces, compiled here on its own, so its time includes ~20 us of Dynamo call
  overhead per call that the step does not pay). ``max|diff|``: largest difference from SDPA.
* **End to end**: decode tok/s of the whole model with each ``--kernel`` (same loop as ``fmchat bench decode``: prefill
  C tokens, decode N greedily, best of the rounds), and with ``--kernel fmc --compile on``.
"""

from __future__ import annotations

import os
import sys

import torch

from . import report

E2E = {  # label -> RunConfig fields
    "sdpa": {"kernel": "sdpa", "compile": "eager"},
    "eager": {"kernel": "eager", "compile": "eager"},
    "fmc": {"kernel": "fmc", "compile": "eager"},
    "fmc + compiled step": {"kernel": "fmc", "compile": "compiled"},
}
ATTENTION_CONTEXTS = (128, 256, 512, 1024, 2048, 4096, 8192)


def log(msg: str) -> None:
    print(f"[bench kernels] {msg}", file=sys.stderr, flush=True)


def _eager_fn(q_heads: int, kv_heads: int, head_dim: int):
    """transformers' own eager attention (the ``--kernel eager`` path) on exact-length K/V."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q_heads // kv_heads, training=False)

    def fn(q, k, v):
        out, _ = eager_attention_forward(module, q, k, v, None, scaling=head_dim**-0.5)
        return out.transpose(1, 2)  # [B, n, H, D] -> [B, H, n, D]

    return fn


def attention_rows(shape: dict, contexts, dtype: torch.dtype, device: str, iters: int) -> list[dict]:
    from fmchat_kernels.attention.bench import decode_attention_bench

    hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    impls = ("sdpa", "fmc") if device != "cpu" else ("sdpa", "fmc-exact", "fmc-cpu", "fmc-fused")
    rows = decode_attention_bench(
        tuple(contexts), q_heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype, device=device, impls=impls,
        extra={"eager": _eager_fn(hq, hkv, d)}, iters=iters,
    )  # fmt: skip
    names = {"fmc-exact": "fmc", "fmc-cpu": "fmc-ragged"}  # as the chat calls it on CPU / the ragged-batch path
    for r in rows:
        r["impl"] = names.get(r["impl"], r["impl"])
    return rows


def bench_kernels(
    model: str | None = None,
    *,
    contexts: list[int] = ATTENTION_CONTEXTS,
    e2e_contexts: list[int] = (128, 1024, 4096),
    configs: list[str] = tuple(E2E),
    new_tokens: int = 32,
    rounds: int = 2,
    iters: int = 20,
    dtype: str = "bfloat16",
    device: str = "cpu",
    threads: int | None = None,
    json_out: bool = False,
) -> dict:
    from fmchat.backends.transformers.backend import pick_device, pick_dtype

    from .decode import bench_decode

    unknown = [c for c in configs if c not in E2E]
    if unknown:
        raise ValueError(f"unknown kernel row '{unknown[0]}' (use: {', '.join(E2E)})")
    run = report.begin("bench kernels")
    dev = pick_device(device)
    e2e = bench_decode(
        model, contexts=list(e2e_contexts), new_tokens=new_tokens, ttft_tokens=min(1024, max(e2e_contexts)),
        configs=list(configs), llamacpp_model=None, dtype=dtype, device=dev, rounds=rounds, threads=threads,
        extra_configs=E2E, quiet=True,
    )  # fmt: skip
    shape = e2e["attention_shape"]
    log(f"decode attention: {shape['q_heads']} query / {shape['kv_heads']} kv heads, head dim {shape['head_dim']}, {dtype}")
    rows = attention_rows(shape, sorted({int(c) for c in contexts}), pick_dtype(dtype, dev), dev, iters)
    result = {
        "model": e2e["model"],
        "device": dev,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "attention": {"shape": shape, "rows": rows},
        "end_to_end": e2e,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    return report.emit(run, result, json_out, lambda: print_tables(result))


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=200)
    rows = result["attention"]["rows"]
    shape = result["attention"]["shape"]
    contexts = sorted({r["ctx"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    t = Table(title=f"decode attention, one layer, one token · {shape['q_heads']}q/{shape['kv_heads']}kv heads × "
                    f"{shape['head_dim']} · {result['dtype']} · {result['device']} · {result['threads']} threads · ms per call")  # fmt: skip
    t.add_column("kernel")
    for c in contexts:
        t.add_column(f"{c}", justify="right")
    t.add_column("max|diff| vs sdpa", justify="right")
    by = {(r["impl"], r["ctx"]): r for r in rows}
    for name in impls:
        cells = [f"{by[(name, c)]['ms']:.3f}" if (name, c) in by else "" for c in contexts]
        diff = max(by[(name, c)]["max_abs_diff"] for c in contexts if (name, c) in by)
        t.add_row(name, *cells, f"{diff:.1e}")
    console.print(t)
    e2e = result["end_to_end"]
    t = Table(title=f"end to end · {e2e['model']} · decode tok/s after C prompt tokens · {e2e['new_tokens']} tokens per "
                    f"cell, best of {e2e['rounds']}")  # fmt: skip
    t.add_column("--kernel")
    t.add_column("path")
    for c in e2e["contexts"]:
        t.add_column(f"tok/s @{c}", justify="right")
    t.add_column(f"TTFT {e2e['ttft_tokens']} (ms)", justify="right")
    for r in e2e["rows"]:
        t.add_row(r["config"], r["decode_path"], *[report.num(r["decode_tok_s"].get(str(c)), ".1f") for c in e2e["contexts"]],
                  report.num(r["ttft_ms"], ".0f"))  # fmt: skip
    console.print(t)

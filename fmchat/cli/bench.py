"""``fmchat bench ...``: the benchmarks whose figures README quotes (implementations in fmchat.bench).
Chats are built through the conversation service, never saved."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fmchat.config import RunConfig
from fmchat.errors import UserError

from .app import bench_app
from .chat import open_conversation
from .options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewOpt,
    ModelOpt,
    ScriptOpt,
    ThreadsOpt,
    TurnsOpt,
    csv_items,
    positive_ints,
    read_script,
)

BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="transformers | llamacpp | openai")]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8080/v1")]
ApiModelOpt = Annotated[str | None, typer.Option("--api-model", help="Model name on the server (default: the first it lists).")]
QuantOpt = Annotated[str, typer.Option("--quant", help="transformers row: none | bf16 | fp16 | int8 | int4 | log8")]
CompileOpt = Annotated[str, typer.Option("--compile", help="transformers row's decode path: auto | eager | compiled")]


def _script_turns(script: Path | None, turns: int | None = None) -> list[str]:
    from fmchat.bench import default_script

    return read_script(script or default_script())[: turns or None]


def _greedy(model: str | None, **fields) -> RunConfig:
    """A benchmark chat: greedy, seeded, never saved."""
    return RunConfig(model=model, temperature=0.0, seed=0, **fields).check()


@bench_app.command("turns")
def bench_turns_cmd(
    model: ModelOpt = None,
    turns: TurnsOpt = None,
    script: ScriptOpt = None,
    max_new_tokens: MaxNewOpt = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a scripted conversation with the KV cache on, then off, in one process; compare TTFT and replies."""
    from fmchat.bench import bench_turns

    user_turns = _script_turns(script, turns)
    conv = open_conversation(_greedy(model, max_new_tokens=max_new_tokens, device=device, dtype=dtype, threads=threads), save=False)
    bench_turns(conv.session, user_turns, json_out=json_out)


@bench_app.command("backends")
def bench_backends_cmd(
    model: ModelOpt = None,
    turns: TurnsOpt = None,
    script: ScriptOpt = None,
    max_new_tokens: MaxNewOpt = 128,
    base_url: BaseUrlOpt = None,
    api_model: ApiModelOpt = None,
    threads: ThreadsOpt = None,
    quant: QuantOpt = "none",
    compile_: CompileOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """The shared conversation on transformers and llama.cpp (and a server with --base-url), one after another.

    --quant and --compile apply to the transformers row. With the default decode path (auto) the bench waits for the
    compiled step before the first turn (loaded from the compile cache after a first run), so every turn uses it."""
    from fmchat.bench.backends import bench_backends

    user_turns = _script_turns(script, turns)
    common = {"max_new_tokens": max_new_tokens, "threads": threads}
    configs = {
        "transformers": _greedy(model, backend="transformers", quant=quant, compile=compile_, **common),
        "llamacpp": _greedy(model, backend="llamacpp", **common),
    }
    if base_url:
        configs["openai"] = _greedy(model, backend="openai", base_url=base_url, api_model=api_model, **common)
    sessions = {label: open_conversation(c, save=False).session for label, c in configs.items()}
    bench_backends(sessions, user_turns, json_out=json_out)


@bench_app.command("quant")
def bench_quant_cmd(
    model: ModelOpt = None,
    turns: TurnsOpt = None,
    script: ScriptOpt = None,
    schemes: Annotated[str, typer.Option("--schemes", help="Comma-separated: fp32,bf16,fp16,int8,int4,log8.")] = "fp32,bf16,fp16,int8,int4,log8",
    max_new_tokens: MaxNewOpt = 48,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Every quantization scheme in one run (a process each): weights bytes, RSS, decode tok/s, perplexity, agreement."""
    from fmchat.bench.quant import ROWS, bench_quant

    user_turns = _script_turns(script, turns)
    chosen = csv_items(schemes)
    bad = [x for x in chosen if x not in ROWS]
    if bad:
        raise UserError(f"--schemes: unknown {', '.join(bad)} (use {', '.join(ROWS)})")
    try:
        bench_quant(model, user_turns, schemes=chosen, max_new_tokens=max_new_tokens, threads=threads, json_out=json_out)
    except RuntimeError as exc:  # a worker process failed: its stderr tail is in the message
        raise UserError(str(exc)) from None


@bench_app.command("memory")
def bench_memory_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "transformers",
    ctx: Annotated[int, typer.Option("--ctx", min=64, help="Context window (tokens).")] = 512,
    turns: Annotated[int, typer.Option("--turns", min=1, help="Turns to run (the script repeats).")] = 60,
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies to compare.")] = "none,sliding,shift,summary",
    script: ScriptOpt = None,
    max_new_tokens: MaxNewOpt = 48,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A long chat in a small window under each memory policy: TTFT, fill, evictions, recall, perplexity."""
    from fmchat import registry
    from fmchat.bench.memory import bench_memory

    chosen = csv_items(policies)
    if not chosen:
        raise UserError("--policies: name at least one policy")
    for p in chosen:
        registry.POLICIES.require(p)
    user_turns = _script_turns(script)
    conv = open_conversation(_greedy(model, backend=backend, ctx=ctx, max_new_tokens=max_new_tokens, dtype=dtype, threads=threads), save=False)
    bench_memory(conv.session, user_turns, turns, chosen, json_out=json_out)


@bench_app.command("load")
def bench_load_cmd(
    model: ModelOpt = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Later loads to time.")] = 2,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Time the first load (with GGUF conversion, in a throwaway cache) and later loads."""
    from fmchat.bench.load import bench_load

    bench_load(model, device=device, dtype=dtype, repeats=repeats, json_out=json_out)


@bench_app.command("decode")
def bench_decode_cmd(
    model: ModelOpt = None,
    contexts: Annotated[str, typer.Option("--contexts", help="Comma-separated context lengths (tokens) to decode at.")] = "128,1024,4096",
    configs: Annotated[str, typer.Option("--configs", help="Rows: generate(),eager,compiled,compiled+int8,compiled+int4,llama.cpp")] = "generate(),eager,compiled,compiled+int8,compiled+int4,llama.cpp",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens decoded (timed) per cell.")] = 32,
    ttft_tokens: Annotated[int, typer.Option("--ttft-tokens", min=1, help="Prompt tokens for the TTFT column.")] = 1024,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Passes over every row; the best per cell is kept.")] = 2,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 (transformers rows)")] = "bfloat16",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Decode tok/s at several contexts for generate(), eager, compiled (+int8/int4) and llama.cpp, in one run."""
    from fmchat.bench.decode import CONFIGS, bench_decode

    ctxs = positive_ints("--contexts", contexts)
    chosen = csv_items(configs)
    bad = [c for c in chosen if c not in CONFIGS]
    if bad:
        raise UserError(f"--configs: unknown {', '.join(bad)} (use {', '.join(CONFIGS)})")
    try:
        bench_decode(model, contexts=ctxs, configs=chosen, new_tokens=new_tokens, ttft_tokens=ttft_tokens, rounds=rounds,
                     dtype=dtype, device=device, threads=threads, json_out=json_out)  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from None


@bench_app.command("kernels")
def bench_kernels_cmd(
    model: ModelOpt = None,
    contexts: Annotated[str, typer.Option("--contexts", help="Context lengths (tokens) for the decode-attention table.")] = "128,256,512,1024,2048,4096,8192",
    e2e_contexts: Annotated[str, typer.Option("--e2e-contexts", help="Context lengths for the end-to-end decode table.")] = "128,1024,4096",
    configs: Annotated[str, typer.Option("--configs", help="End-to-end rows: sdpa,eager,fmc,fmc + compiled step")] = "sdpa,eager,fmc,fmc + compiled step",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens decoded (timed) per end-to-end cell.")] = 32,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="End-to-end passes over every row; the best per cell is kept.")] = 2,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Timed calls per decode-attention cell.")] = 20,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "bfloat16",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Decode-attention time per kernel vs context length, and end-to-end decode tok/s per --kernel, in one run."""
    from fmchat.bench.kernels import bench_kernels

    ctxs = positive_ints("--contexts", contexts)
    e2e = positive_ints("--e2e-contexts", e2e_contexts)
    try:
        bench_kernels(model, contexts=ctxs, e2e_contexts=e2e, configs=csv_items(configs), new_tokens=new_tokens,
                      rounds=rounds, iters=iters, dtype=dtype, device=device, threads=threads, json_out=json_out)  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from None


@bench_app.command("shape")
def bench_shape_cmd(
    name: Annotated[str, typer.Argument(help="A shipped shape (phi-3.5, qwen2.5-0.5b, llama-3.2-1b) or a config.json path.")],
    quant: Annotated[str, typer.Option("--quant", help="Comma-separated transformers rows, each in its own process: none,bf16,fp16,int8,int4,log8.")] = "bf16,int8,int4,log8",
    llamacpp: Annotated[bool, typer.Option("--llamacpp/--no-llamacpp", help="Add the llama.cpp Q8_0 row on the same random weights.")] = True,
    ttft_tokens: Annotated[int, typer.Option("--ttft-tokens", min=1, help="Prompt tokens for the TTFT column.")] = 512,
    contexts: Annotated[str, typer.Option("--contexts", help="Comma-separated context lengths (tokens) to decode at.")] = "128,1024",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens decoded (timed) per context.")] = 16,
    threads: ThreadsOpt = None,
    compile_: Annotated[str, typer.Option("--compile", help="transformers rows' decode path: eager | compiled (compiled at load, or loaded from the compile cache).")] = "eager",
    json_out: JsonOpt = False,
) -> None:
    """What a model of this shape costs here, on random weights: load, peak RSS, weights, KV/token, TTFT, decode tok/s."""
    from fmchat import registry
    from fmchat.bench.shape import bench_shape

    chosen = list(dict.fromkeys(csv_items(quant)))
    if not chosen and not llamacpp:
        raise UserError("--quant: name at least one row (or keep --llamacpp)")
    for q in chosen:
        registry.QUANTS.require(q)
    if llamacpp:
        registry.BACKENDS.require("llamacpp")  # "needs llama-cpp-python" where it is not installed
    ctxs = positive_ints("--contexts", contexts)
    if compile_ not in ("eager", "compiled"):
        raise UserError(f"--compile: {compile_!r} is not eager or compiled")
    try:
        bench_shape(name, quants=chosen, llamacpp=llamacpp, ttft_tokens=ttft_tokens, contexts=ctxs, new_tokens=new_tokens,
                    threads=threads, json_out=json_out, compile=compile_)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None


@bench_app.command("arch")
def bench_arch_cmd(
    model: ModelOpt = None,
    checks: Annotated[str, typer.Option("--checks", help="Comma-separated: reuse,fmc,compiled,shift,llamacpp.")] = "reuse,fmc,compiled,shift,llamacpp",
    turns: TurnsOpt = None,
    script: ScriptOpt = None,
    max_new_tokens: MaxNewOpt = 32,
    shift_ctx: Annotated[int, typer.Option("--shift-ctx", min=64, help="Context window of the shift checks (tokens).")] = 256,
    shift_turns: Annotated[int, typer.Option("--shift-turns", min=1, help="Turns of the shift checks (the script repeats).")] = 18,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Whether a model's architecture runs end to end: KV reuse = re-prefill, fmc = sdpa, compiled = eager (float32,
    token ids), --memory shift in a small window shifts on every layer, llama.cpp on the same file. Exits 1 on a failure."""
    from fmchat.bench.arch import CHECKS, Plan, bench_arch

    chosen = list(dict.fromkeys(csv_items(checks)))
    bad = [c for c in chosen if c not in CHECKS]
    if bad or not chosen:
        raise UserError(f"--checks: unknown {', '.join(bad)} (use {', '.join(CHECKS)})" if bad else "--checks: name at least one check")
    from fmchat import models

    models.resolve(model)  # an unknown model is one line here, before any check runs
    plan = Plan(model, _script_turns(script, turns), max_new_tokens=max_new_tokens, shift_ctx=shift_ctx,
                shift_turns=shift_turns, device=device, threads=threads)  # fmt: skip
    result = bench_arch(plan, chosen, lambda config: open_conversation(config, save=False), json_out=json_out)
    if not result["passed"]:
        failed = ", ".join(result["failed"]) or "none passed"
        typer.echo(f"fmchat: bench arch: {len(result['failed'])} of {len(result['checks'])} checks failed ({failed})", err=True)
        raise typer.Exit(1)

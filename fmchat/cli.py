"""fmchat's command line (typer). Commands parse flags, build a session and print what comes back."""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from fmchat import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Chat with local language models and see what inference really costs.",
)
bench_app = typer.Typer(help="Benchmarks whose numbers the README quotes.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
sessions_app = typer.Typer(help="Saved conversations: list, show, export, import, remove.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")


class UserError(Exception):
    """Bad input: printed as one line on stderr, exit code 2."""


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"fmchat: error: {message}", err=True)
    return typer.Exit(code)


# ---------------------------------------------------------------- shared options
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Alias, local HF dir, .gguf file or hub id.")]
KvOpt = Annotated[bool, typer.Option("--kv-cache/--no-kv-cache", help="Reuse the KV cache across turns.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens per reply.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling seed (reproducible replies).")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", min=16, help="Context window cap (tokens).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for PyTorch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
KernelOpt = Annotated[str, typer.Option("--kernel", help="Attention: sdpa | eager | fmc (kernels/attention).")]
QuantOpt = Annotated[str, typer.Option("--quant", help="Weights: none | bf16 | fp16 | int8 | int4 | log8 (kernels/quant).")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="transformers | llamacpp | openai")]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8080/v1")]
ApiModelOpt = Annotated[str | None, typer.Option("--api-model", help="Model name on the server (default: the first it lists).")]
MemoryOpt = Annotated[str, typer.Option("--memory", help="When the window is full: none | sliding | shift | summary")]
GpuLayersOpt = Annotated[int, typer.Option("--gpu-layers", help="llama.cpp: layers offloaded to the GPU (-1 = all).")]
CompileOpt = Annotated[str, typer.Option("--compile", help="transformers: torch.compile the decode step: off | on (falls back to eager, reported).")]


def _progress_printer(quiet: bool = False):
    def progress(step: str, fraction: float | None = None) -> None:
        if not quiet:
            typer.echo(f"[fmchat] {step}", err=True)

    return progress


def load_session(
    model,
    *,
    kv_cache=True,
    system=None,
    max_new_tokens=512,
    temperature=0.7,
    top_p=0.95,
    seed=None,
    ctx=None,
    device="auto",
    dtype="auto",
    threads=None,
    quiet=False,
    backend="transformers",
    memory="shift",
    **load_options,
):
    """Load a backend and wrap it in a ChatSession, turning user errors into UserError.

    ``load_options`` are further LoadOptions fields (base_url, api_model, gpu_layers, ...).
    """
    from fmchat import backends, models
    from fmchat.backends.openai_backend import BackendError
    from fmchat.engine import ChatSession, GenerationConfig, SessionConfig
    from fmchat.engine.session import set_threads

    from fmchat.memory import POLICIES

    if memory not in POLICIES:
        raise UserError(f"unknown memory policy '{memory}' (use {', '.join(POLICIES)})")
    set_threads(threads)
    opts = backends.LoadOptions(device=device, dtype=dtype, ctx=ctx, threads=threads, **load_options)
    try:
        backend = backends.load(model, backend, opts, _progress_printer(quiet))
    except (models.ModelNotFound, backends.UnknownBackend, BackendError, ValueError) as exc:
        raise UserError(str(exc)) from None
    r = backend.load_report
    if not quiet:
        how = "converted GGUF to safetensors, then loaded" if r.converted else "loaded"
        typer.echo(
            f"[fmchat] {how} {backend.model_name} ({backend.name}, {backend.device}, {backend.dtype}) in {r.seconds:.2f} s",
            err=True,
        )
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return ChatSession(backend, SessionConfig(system=system, kv_cache=kv_cache, ctx=ctx, gen=gen, memory=memory))


def stats_line(stats) -> str:
    def na(v):
        return "n/a" if v is None else v

    dec = f"{stats.decode_tok_s:.1f} tok/s" if stats.decode_tok_s else "n/a tok/s"
    return (
        f"[{na(stats.generated_tokens)} tokens · TTFT {stats.ttft_ms:.0f} ms · decode {dec} · "
        f"prefilled {na(stats.prefilled_tokens)}, reused {na(stats.reused_tokens)} · "
        f"context {na(stats.ctx_used)}/{na(stats.ctx_size)} tokens · RSS {stats.rss_mb:.0f} MiB"
        + (" · cancelled" if stats.cancelled else "")
        + (f" · memory: {stats.memory_note}" if stats.memory_action else "")
        + "]"
    )


def csv_items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [x.strip() for x in text.split(",") if x.strip()]


def positive_ints(option: str, text: str) -> list[int]:
    """A comma-separated option of positive integers, or a one-line UserError naming the option."""
    try:
        values = [int(x) for x in csv_items(text)]
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option}: comma-separated positive integers")
    return values


def read_script(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--script {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--script {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--script {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    turns = data.get("turns") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise UserError(f"--script {path}: expected an object with a 'turns' list of strings")
    return turns


# ---------------------------------------------------------------- root: the TUI
def launch_tui(threads: int | None = None, session_id: str | None = None, **flags) -> None:
    """Open the full-screen app: settings from the config file, then the CLI flags (non-None) on top."""
    from fmchat import models
    from fmchat import settings as settings_mod

    if session_id is not None:
        with open_store() as store:
            session_id = resolve_session(store, session_id)

    try:
        file_settings = settings_mod.load()
    except settings_mod.SettingsError as exc:
        raise UserError(str(exc)) from None
    overrides = {k: v for k, v in flags.items() if v is not None}
    settings = file_settings.override(**overrides)
    problems = settings.validate()
    if problems:
        raise UserError(problems[0])
    try:
        models.resolve(settings.model)
    except models.ModelNotFound as exc:
        raise UserError(str(exc)) from None
    from fmchat.tui.themes import theme_names

    names = theme_names()
    if settings.theme not in names:
        if "theme" in overrides:
            raise UserError(f"unknown theme '{settings.theme}' (available: {', '.join(names)})")
        settings.theme = settings_mod.DEFAULT_THEME  # a theme file that went away: fall back quietly
    from fmchat.tui.app import FmchatApp

    FmchatApp(settings, file_settings=file_settings, cli_overrides=overrides, threads=threads, session_id=session_id).run()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    model: ModelOpt = None,
    kv_cache: Annotated[bool | None, typer.Option("--kv-cache/--no-kv-cache", help="Reuse the KV cache across turns.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="transformers (llamacpp, openai: later)")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="none | bf16 | fp16 (int8, int4, log8: later)")] = None,
    kernel: Annotated[str | None, typer.Option("--kernel", help="Attention kernel: sdpa | eager | fmc")] = None,
    base_url: BaseUrlOpt = None,
    api_model: ApiModelOpt = None,
    ctx_size: Annotated[int | None, typer.Option("--ctx", min=16, help="Context window cap (tokens).")] = None,
    system: SystemOpt = None,
    theme: Annotated[str | None, typer.Option("--theme", help="fmchat-dark | fmchat-light | fmchat-high-contrast | ...")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")] = None,
    threads: ThreadsOpt = None,
    session_id: Annotated[str | None, typer.Option("--session", help="Open this saved session (fmchat sessions list).")] = None,
) -> None:
    """Without a command, fmchat opens the full-screen chat app (settings: F2; keys: F1; sessions: F4)."""
    if version:
        typer.echo(f"fmchat {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        try:
            launch_tui(
                threads, session_id=session_id, model=model, kv_cache=kv_cache, backend=backend, quant=quant, kernel=kernel, ctx=ctx_size,
                system=system, theme=theme, device=device, dtype=dtype, base_url=base_url, api_model=api_model,
            )  # fmt: skip
        except UserError as exc:
            raise fail(str(exc)) from None


# ---------------------------------------------------------------- run
@app.command()
def run(
    prompts: Annotated[list[str] | None, typer.Argument(help="User turns of one conversation (else stdin lines).")] = None,
    model: ModelOpt = None,
    kv_cache: KvOpt = True,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TempOpt = 0.7,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    script: Annotated[Path | None, typer.Option("--script", help="JSON file with a 'turns' list.")] = None,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = "none",
    kernel: KernelOpt = "sdpa",
    compile_: CompileOpt = "off",
    threads: ThreadsOpt = None,
    backend: BackendOpt = "transformers",
    base_url: BaseUrlOpt = None,
    api_model: ApiModelOpt = None,
    gpu_layers: GpuLayersOpt = 0,
    memory: MemoryOpt = "shift",
    session_id: Annotated[str | None, typer.Option("--session", help="Continue this saved session.")] = None,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Save the conversation as a session.")] = True,
) -> None:
    """Run one conversation headless: each PROMPT (or stdin line, or --script turn) is a user turn.

    The conversation is saved as a session (its id goes to stderr as 'session: ID'); --session ID continues one.
    """
    from fmchat.backends.openai_backend import BackendError
    from fmchat.engine import ContextOverflow, TextDelta, TurnDone
    from fmchat.store.db import StoreError
    from fmchat.text import neutralize

    try:
        if script is not None:
            turns = read_script(script)
        elif prompts:
            turns = list(prompts)
        elif not sys.stdin.isatty():
            turns = [line.rstrip("\r\n") for line in sys.stdin]
        else:
            raise UserError("no prompt: pass PROMPT arguments, pipe lines on stdin, or use --script FILE")
        if not turns:
            raise UserError("no prompt: the input holds no turns")
        for i, t in enumerate(turns, 1):
            if not t.strip():
                raise UserError(f"turn {i}: empty prompt")
        store = rec = None
        if save or session_id is not None:
            store = open_store()
        if session_id is not None:
            rec = store.get(resolve_session(store, session_id))
            model = model or rec.settings.get("model_spec") or None
            if system is None:
                system = rec.system
        session = load_session(
            model, kv_cache=kv_cache, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, ctx=ctx, device=device, dtype=dtype, threads=threads, quant=quant, kernel=kernel, compile=compile_,
            backend=backend, base_url=base_url, api_model=api_model, gpu_layers=gpu_layers, memory=memory,
        )  # fmt: skip
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None

    recorder = None
    if store is not None:
        from fmchat.store import Recorder, kvsnap, open_session, rebuild_cache

        if rec is not None:
            recorder, rec = open_session(store, rec.id, session, spec=model)
            session.config.system = system
            if not save:
                recorder = None  # continue it here, but leave the saved session as it is
            typer.echo(f"session: {rec.id}", err=True)
            r = rebuild_cache(session, store, rec.id)
            typer.echo(
                f"[fmchat] resumed {len(session.messages)} messages: {r['restored']} tokens from the KV snapshot"
                f" ({r['snapshot']}), {r['prefilled']} prefilled",
                err=True,
            )
        else:
            recorder = Recorder(store, spec=model)

    def record() -> None:
        if recorder is None:
            return
        had = recorder.session_id
        try:
            recorder.sync(session)
        except Exception as exc:  # the chat goes on; say that it is not being saved
            typer.echo(f"fmchat: warning: could not save the session: {exc}", err=True)
            return
        if had is None and recorder.session_id is not None:
            typer.echo(f"session: {recorder.session_id}", err=True)

    from fmchat.engine import TurnStarted

    for i, text in enumerate(turns, 1):
        try:
            for ev in session.turn(text):
                if isinstance(ev, TurnStarted):
                    record()  # the user message is on disk before generation starts
                if isinstance(ev, TextDelta) and not json_out:
                    sys.stdout.write(neutralize(ev.text))
                    sys.stdout.flush()
                elif isinstance(ev, TurnDone):
                    if json_out:
                        print(json.dumps({"turn": i, "user": text, "reply": ev.reply, **ev.stats.to_dict()}), flush=True)
                    else:
                        sys.stdout.write("\n")
                        sys.stdout.flush()
                        typer.echo(stats_line(ev.stats), err=True)
                    record()  # the reply, as soon as it is complete (or cancelled)
        except ContextOverflow as exc:
            raise fail(f"turn {i}: {exc}") from None
        except BackendError as exc:  # the server failed; say so in one line
            raise fail(f"turn {i}: {exc}", code=1) from None
        finally:
            record()
    if recorder is not None and recorder.session_id is not None:
        try:
            kvsnap.save(store, recorder.session_id, session)
        except Exception as exc:
            typer.echo(f"fmchat: warning: could not save the KV snapshot: {exc}", err=True)


# ---------------------------------------------------------------- chat (plain REPL)
REPL_HELP = "/quit  leave · /stats  show the last turn's stats · /reset  new conversation · /help  this line"


@app.command()
def chat(
    plain: Annotated[bool, typer.Option("--plain", help="Line-mode REPL instead of the full-screen app.")] = False,
    model: ModelOpt = None,
    kv_cache: KvOpt = True,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TempOpt = 0.7,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = "none",
    kernel: KernelOpt = "sdpa",
    compile_: CompileOpt = "off",
    threads: ThreadsOpt = None,
    backend: BackendOpt = "transformers",
    base_url: BaseUrlOpt = None,
    api_model: ApiModelOpt = None,
    gpu_layers: GpuLayersOpt = 0,
    memory: MemoryOpt = "shift",
    save: Annotated[bool, typer.Option("--save/--no-save", help="--plain: save the conversation as a session.")] = True,
) -> None:
    """Interactive chat. With --plain, a line-mode REPL: Ctrl+C cancels a reply, /quit leaves."""
    if not plain:
        # Flags left at their defaults do not override the settings file.
        try:
            launch_tui(
                threads, model=model, kv_cache=None if kv_cache else False, system=system, ctx=ctx, seed=seed,
                device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                max_new_tokens=None if max_new_tokens == 512 else max_new_tokens,
                temperature=None if temperature == 0.7 else temperature, top_p=None if top_p == 0.95 else top_p,
            )  # fmt: skip
        except UserError as exc:
            raise fail(str(exc)) from None
        return
    try:
        session = load_session(
            model, kv_cache=kv_cache, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, ctx=ctx, device=device, dtype=dtype, threads=threads, quant=quant, kernel=kernel, compile=compile_,
            backend=backend, base_url=base_url, api_model=api_model, gpu_layers=gpu_layers, memory=memory,
        )  # fmt: skip
    except UserError as exc:
        raise fail(str(exc)) from None
    recorder = None
    if save:
        from fmchat.store import Recorder

        try:
            recorder = Recorder(open_store(), spec=model)
        except UserError as exc:
            typer.echo(f"fmchat: warning: {exc}; this chat is not saved", err=True)
    repl(session, recorder)


def repl(session, recorder=None) -> None:
    """``recorder`` (fmchat.store.Recorder): save each message as it happens (user before the reply)."""
    from rich.console import Console
    from rich.text import Text

    from fmchat.engine import ContextOverflow, TextDelta, TurnDone, TurnStarted
    from fmchat.text import neutralize

    out = Console(highlight=False)
    out.print(Text(f"fmchat · {session.backend.model_name} · {REPL_HELP}", style="dim"))
    last = None
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:
            out.print(Text("\n(Ctrl+C cancels a reply; /quit or Ctrl+D leaves)", style="dim"))
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/help":
            out.print(Text(REPL_HELP, style="dim"))
            continue
        if cmd == "/reset":
            session.reset()
            if recorder is not None:
                recorder.detach()  # the next message starts a new saved session
            last = None
            out.print(Text("(new conversation)", style="dim"))
            continue
        if cmd == "/stats":
            s = last or session.snapshot_stats()
            for k, v in s.to_dict().items():
                out.print(Text(f"  {k}: {v}"))
            continue

        events: queue.Queue = queue.Queue()

        def save(events: queue.Queue = events) -> None:
            if recorder is None:
                return
            had = recorder.session_id
            try:
                recorder.sync(session)
            except Exception as exc:
                events.put(RuntimeError(f"could not save the session: {exc}"))
                return
            if had is None and recorder.session_id is not None:
                typer.echo(f"session: {recorder.session_id}", err=True)

        def worker(text=line):
            try:
                for ev in session.turn(text):
                    if isinstance(ev, (TurnStarted, TurnDone)):
                        save()
                    events.put(ev)
            except Exception as exc:  # reported to the user below, the REPL goes on
                events.put(exc)
            finally:
                save()
            events.put(None)

        # During a reply Ctrl+C cancels the reply (the handler only sets a flag), not the program.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: session.cancel())
        try:
            threading.Thread(target=worker, daemon=True).start()
            out.print(Text("bot> ", style="bold"), end="")
            while True:
                try:
                    ev = events.get(timeout=0.1)  # wake up often so the SIGINT handler runs promptly
                except queue.Empty:
                    continue
                if ev is None:
                    break
                if isinstance(ev, TextDelta):
                    out.print(Text(neutralize(ev.text)), end="")
                elif isinstance(ev, TurnDone):
                    last = ev.stats
                    out.print()
                    out.print(Text(stats_line(ev.stats), style="dim"))
                elif isinstance(ev, ContextOverflow):
                    out.print(Text(f"fmchat: {ev}", style="red"))
                elif isinstance(ev, Exception):
                    out.print(Text(f"fmchat: error: {ev}", style="red"))
        finally:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- models
@app.command("models")
def models_cmd(json_out: JsonOpt = False) -> None:
    """List model aliases and whether each is available locally."""
    from rich.console import Console
    from rich.table import Table

    from fmchat import models

    rows = models.availability()
    if json_out:
        print(json.dumps([{"alias": a.name, "description": a.description, "hub_id": a.hub_id, "available": ok, "where": where} for a, ok, where in rows]))
        return
    table = Table("alias", "model", "available", "where")
    for a, ok, where in rows:
        table.add_row(a.name + (" (default)" if a.name == models.DEFAULT_MODEL else ""), a.description, "yes" if ok else "no", where)
    Console(highlight=False, width=max(140, Console().width)).print(table)
    typer.echo("--model also takes a local HF directory, a .gguf file, or a hub id (org/name).")


# ---------------------------------------------------------------- bench
@bench_app.command("turns")
def bench_turns(
    model: ModelOpt = None,
    turns: Annotated[int | None, typer.Option("--turns", min=1, help="Use the first N turns of the script.")] = None,
    script: Annotated[Path | None, typer.Option("--script", help="Conversation JSON (default: the shared bench script).")] = None,
    max_new_tokens: MaxNewOpt = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a scripted conversation with the KV cache on, then off, in one process; compare TTFT and replies."""
    from fmchat.bench import bench_turns as run_bench
    from fmchat.bench import default_script

    try:
        path = script or default_script()
        user_turns = read_script(path)[: turns or None]
        session = load_session(model, max_new_tokens=max_new_tokens, temperature=0.0, seed=0, device=device, dtype=dtype, threads=threads)
    except UserError as exc:
        raise fail(str(exc)) from None
    run_bench(session, user_turns, json_out=json_out)


@bench_app.command("backends")
def bench_backends_cmd(
    model: ModelOpt = None,
    turns: Annotated[int | None, typer.Option("--turns", min=1, help="Use the first N turns of the script.")] = None,
    script: Annotated[Path | None, typer.Option("--script", help="Conversation JSON (default: the shared bench script).")] = None,
    max_new_tokens: MaxNewOpt = 128,
    base_url: BaseUrlOpt = None,
    api_model: ApiModelOpt = None,
    threads: ThreadsOpt = None,
    quant: QuantOpt = "none",
    compile_: CompileOpt = "off",
    json_out: JsonOpt = False,
) -> None:
    """The shared conversation on transformers and llama.cpp (and a server with --base-url), one after another.

    --quant and --compile apply to the transformers row (e.g. --compile on --quant int8: the fast decode path)."""
    from fmchat.bench import default_script
    from fmchat.bench.backends import bench_backends

    try:
        user_turns = read_script(script or default_script())[: turns or None]
        common = dict(max_new_tokens=max_new_tokens, temperature=0.0, seed=0, threads=threads)
        sessions = {
            "transformers": load_session(model, backend="transformers", quant=quant, compile=compile_, **common),
            "llamacpp": load_session(model, backend="llamacpp", **common),
        }
        if base_url:
            sessions["openai"] = load_session(model, backend="openai", base_url=base_url, api_model=api_model, **common)
    except UserError as exc:
        raise fail(str(exc)) from None
    bench_backends(sessions, user_turns, json_out=json_out)


@bench_app.command("quant")
def bench_quant_cmd(
    model: ModelOpt = None,
    turns: Annotated[int | None, typer.Option("--turns", min=1, help="Use the first N turns of the script.")] = None,
    script: Annotated[Path | None, typer.Option("--script", help="Conversation JSON (default: the shared bench script).")] = None,
    schemes: Annotated[str, typer.Option("--schemes", help="Comma-separated: fp32,bf16,fp16,int8,int4,log8.")] = "fp32,bf16,fp16,int8,int4,log8",
    max_new_tokens: MaxNewOpt = 48,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Every quantization scheme in one run (a process each): weights bytes, RSS, decode tok/s, perplexity, agreement."""
    from fmchat.bench import default_script
    from fmchat.bench.quant import ROWS, bench_quant

    try:
        path = script or default_script()
        user_turns = read_script(path)[: turns or None]
        chosen = csv_items(schemes)
        bad = [x for x in chosen if x not in ROWS]
        if bad:
            raise UserError(f"--schemes: unknown {', '.join(bad)} (use {', '.join(ROWS)})")
        bench_quant(model, user_turns, schemes=chosen, max_new_tokens=max_new_tokens, threads=threads, json_out=json_out)
    except (UserError, RuntimeError) as exc:
        raise fail(str(exc)) from None


@bench_app.command("memory")
def bench_memory_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "transformers",
    ctx: Annotated[int, typer.Option("--ctx", min=64, help="Context window (tokens).")] = 512,
    turns: Annotated[int, typer.Option("--turns", min=1, help="Turns to run (the script repeats).")] = 60,
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies to compare.")] = "none,sliding,shift,summary",
    script: Annotated[Path | None, typer.Option("--script", help="Conversation JSON (default: the shared bench script).")] = None,
    max_new_tokens: MaxNewOpt = 48,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A long chat in a small window under each memory policy: TTFT, fill, evictions, recall, perplexity."""
    from fmchat.bench import default_script
    from fmchat.bench.memory import bench_memory
    from fmchat.memory import POLICIES

    try:
        chosen = csv_items(policies)
        bad = [p for p in chosen if p not in POLICIES]
        if bad or not chosen:
            raise UserError(f"unknown memory policy '{(bad or [''])[0]}' (use {', '.join(POLICIES)})")
        user_turns = read_script(script or default_script())
        session = load_session(model, backend=backend, ctx=ctx, max_new_tokens=max_new_tokens, temperature=0.0, seed=0,
                               dtype=dtype, threads=threads)  # fmt: skip
    except UserError as exc:
        raise fail(str(exc)) from None
    bench_memory(session, user_turns, turns, chosen, json_out=json_out)


@bench_app.command("load")
def bench_load_cmd(
    model: ModelOpt = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Later loads to time.")] = 2,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Time the first load (with GGUF conversion, in a throwaway cache) and later loads."""
    from fmchat import backends, models
    from fmchat.bench.load import bench_load

    try:
        bench_load(model, device=device, dtype=dtype, repeats=repeats, json_out=json_out)
    except (models.ModelNotFound, backends.UnknownBackend, ValueError) as exc:
        raise fail(str(exc)) from None


# ---------------------------------------------------------------- sessions
def open_store(path: Path | None = None):
    """The session store, or UserError (e.g. a database written by a newer fmchat: left untouched)."""
    from fmchat.store import Store, StoreError

    try:
        return Store(path)
    except StoreError as exc:
        raise UserError(str(exc)) from None


def resolve_session(store, session_id: str) -> str:
    from fmchat.store import UnknownSession

    try:
        return store.resolve(session_id)
    except UnknownSession as exc:
        raise UserError(str(exc)) from None


from fmchat.store.db import StoreError  # stdlib only: cheap to import


def _when(t: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


@sessions_app.command("list")
def sessions_list(
    search: Annotated[str | None, typer.Option("--search", "-s", help="Only sessions whose title or text contains this.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Saved sessions, newest first."""
    try:
        with open_store() as store:
            rows = store.list_sessions(search)
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None
    if json_out:
        print(json.dumps([{"id": r.id, "title": r.title, "model": r.model, "backend": r.backend, "created": r.created,
                           "updated": r.updated, "messages": r.message_count} for r in rows]))  # fmt: skip
        return
    if not rows:
        typer.echo("no saved sessions" + (f" matching '{search}'" if search else ""))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from fmchat.text import neutralize

    table = Table("id", "title", "model", "updated", "messages")
    for r in rows:
        table.add_row(r.id, Text(neutralize(r.title)), Text(neutralize(r.model)), _when(r.updated), str(r.message_count))
    Console(highlight=False).print(table)


@sessions_app.command("show")
def sessions_show(session_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Print a session as Markdown."""
    from fmchat.store import transcript
    from fmchat.text import neutralize

    try:
        with open_store() as store:
            rec = store.get(resolve_session(store, session_id))
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None
    sys.stdout.write(neutralize(transcript.to_markdown(rec)))


@sessions_app.command("export")
def sessions_export(
    session_id: Annotated[str, typer.Argument(metavar="ID")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="md | json")] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE (0600) instead of stdout.")] = None,
) -> None:
    """Export a session as Markdown or as the versioned JSON transcript (docs/sessions.md)."""
    from fmchat.store import transcript

    try:
        if fmt not in ("md", "json"):
            raise UserError(f"--format {fmt}: use md or json")
        with open_store() as store:
            rec = store.get(resolve_session(store, session_id))
        text = transcript.to_json(rec) if fmt == "json" else transcript.to_markdown(rec)
        if output is None:
            if sys.stdout.isatty():  # shown on a terminal: control characters are displayed, never acted on
                from fmchat.text import neutralize

                text = neutralize(text)
            sys.stdout.write(text)
            return
        try:
            transcript.write_private(output, text)
        except OSError as exc:
            raise UserError(f"-o {output}: cannot write ({exc.strerror})") from None
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {output}", err=True)


@sessions_app.command("import")
def sessions_import(file: Annotated[Path, typer.Argument(metavar="FILE", help="A JSON transcript (fmchat sessions export --format json).")]) -> None:
    """Import a JSON transcript as a new session (its id kept unless taken); prints the id."""
    from fmchat.store import transcript

    try:
        try:
            rec = transcript.read_file(file)  # everything is checked before anything is written
        except transcript.TranscriptError as exc:
            raise UserError(f"import: {exc}; nothing was imported") from None
        with open_store() as store:
            sid = store.insert_record(rec)
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None
    typer.echo(sid)


@sessions_app.command("rm")
def sessions_rm(session_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a session (and its KV snapshot)."""
    try:
        with open_store() as store:
            sid = store.delete(resolve_session(store, session_id))
    except (UserError, StoreError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"deleted {sid}", err=True)


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
    from fmchat import backends, models
    from fmchat.bench.decode import CONFIGS, bench_decode

    try:
        ctxs = positive_ints("--contexts", contexts)
        chosen = csv_items(configs)
        bad = [c for c in chosen if c not in CONFIGS]
        if bad:
            raise UserError(f"--configs: unknown {', '.join(bad)} (use {', '.join(CONFIGS)})")
        bench_decode(model, contexts=ctxs, configs=chosen, new_tokens=new_tokens, ttft_tokens=ttft_tokens, rounds=rounds,
                     dtype=dtype, device=device, threads=threads, json_out=json_out)  # fmt: skip
    except (UserError, ValueError, models.ModelNotFound, backends.UnknownBackend) as exc:
        raise fail(str(exc)) from None


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
    from fmchat import backends, models
    from fmchat.bench.kernels import bench_kernels

    try:
        ctxs = positive_ints("--contexts", contexts)
        e2e = positive_ints("--e2e-contexts", e2e_contexts)
        bench_kernels(model, contexts=ctxs, e2e_contexts=e2e, configs=csv_items(configs), new_tokens=new_tokens,
                      rounds=rounds, iters=iters, dtype=dtype, device=device, threads=threads, json_out=json_out)  # fmt: skip
    except (UserError, ValueError, models.ModelNotFound, backends.UnknownBackend) as exc:
        raise fail(str(exc)) from None


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.echo(f"fmchat: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

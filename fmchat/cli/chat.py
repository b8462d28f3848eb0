"""The chat entry points: ``fmchat`` (the app), ``run`` (headless), ``chat`` (the app, or ``--plain`` REPL),
and ``models``. Every one takes the same chat options (generated from RunConfig) and builds its chat through
``fmchat.conversation``."""

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
from fmchat.backends.base import BackgroundDecode
from fmchat.config import RunConfig
from fmchat.errors import FmchatError, UserError
from fmchat.text import count

from .app import app, pause_gc, progress_printer, warn
from .options import JsonOpt, given, read_script, run_config, with_config_options


def stats_line(stats) -> str:
    def na(v):
        return "n/a" if v is None else v

    dec = f"{stats.decode_tok_s:.1f} tok/s" if stats.decode_tok_s else "n/a tok/s"
    ttft = f"{stats.ttft_ms:.0f} ms" if stats.ttft_ms else "n/a"
    return (
        f"[{count(stats.generated_tokens, 'token')} · TTFT {ttft} · decode {dec} · "
        f"prefilled {na(stats.prefilled_tokens)}, reused {na(stats.reused_tokens)} · "
        f"context {na(stats.ctx_used)}/{na(stats.ctx_size)} tokens · RSS {stats.rss_mb:.0f} MiB"
        + (" · cancelled" if stats.cancelled else "")
        + (f" · memory: {stats.memory_note}" if stats.memory_action else "")
        + "]"
    )


def open_conversation(config: RunConfig, *, save: bool = True, quiet: bool = False):
    """Load the chat ``config`` describes, printing progress and the load line on stderr."""
    from fmchat.conversation import Conversation, describe_load

    conv = Conversation.open(config, progress=progress_printer(quiet), save=save, warn=warn,
                             notice=None if quiet else progress_printer())  # fmt: skip
    if not quiet:
        typer.echo(f"[fmchat] {describe_load(conv.backend)}", err=True)
    return conv


# ---------------------------------------------------------------- the app
def launch_tui(options: dict, session_id: str | None = None) -> None:
    """Open the full-screen app: settings from the config file, then the flags the user gave on top."""
    from fmchat import models
    from fmchat import settings as settings_mod

    if session_id is not None:
        from fmchat.store import Store

        with Store() as store:
            session_id = store.resolve(session_id)
    file_config = settings_mod.load()
    overrides = given(options)
    config = file_config.override(**overrides).check()
    models.resolve(config.model)  # an unknown model is a one-line error here, not a failed load in the app
    from fmchat.tui.themes import theme_names

    names = theme_names()
    if config.theme not in names:
        if "theme" in overrides:
            raise UserError(f"unknown theme '{config.theme}' (available: {', '.join(names)})")
        config.theme = settings_mod.DEFAULT_THEME  # a theme file that went away: fall back quietly
    from fmchat.tui.app import FmchatApp

    FmchatApp(config, file_settings=file_config, cli_overrides=overrides, session_id=session_id).run()


@app.callback(invoke_without_command=True)
@with_config_options("app")
def root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    session_id: Annotated[str | None, typer.Option("--session", help="Open this saved session (fmchat sessions list).")] = None,
    **options,
) -> None:
    """Without a command, fmchat opens the full-screen chat app (settings: F2; keys: F1; sessions: F4)."""
    if version:
        typer.echo(f"fmchat {__version__}")
        raise typer.Exit()
    if context.invoked_subcommand is None:
        launch_tui(options, session_id)


# ---------------------------------------------------------------- run
@app.command()
@with_config_options("chat")
def run(
    prompts: Annotated[list[str] | None, typer.Argument(help="User turns of one conversation (else stdin lines).")] = None,
    script: Annotated[Path | None, typer.Option("--script", help="JSON file with a 'turns' list.")] = None,
    json_out: JsonOpt = False,
    session_id: Annotated[str | None, typer.Option("--session", help="Continue this saved session.")] = None,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Save the conversation as a session.")] = True,
    **options,
) -> None:
    """Run one conversation headless: each PROMPT (or stdin line, or --script turn) is a user turn.

    The conversation is saved as a session (its id goes to stderr as 'session: ID'); --session ID continues one.
    """
    resume_gc = pause_gc()  # on again once the first reply text is out (the imports and the load run without it)
    try:
        _run(prompts, script, json_out, session_id, save, options, resume_gc)
    finally:
        resume_gc()


def _run(prompts, script, json_out, session_id, save, options, first_output) -> None:
    """``run``'s body; ``first_output()`` is called once the first reply text (or JSON line) has been written."""
    from fmchat.engine import TextDelta, TurnDone
    from fmchat.text import neutralize

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
    config = run_config(options)
    if session_id is not None and config.model is None:
        from fmchat.conversation import Conversation

        probe = Conversation(config, save=False)
        try:
            config = config.override(model=probe.saved_model(session_id))  # continue on the model it was recorded with
        finally:
            probe.close()
    conv = open_conversation(config, save=save)
    if session_id is not None:
        r = conv.resume(session_id, system=config.system)  # a --system given now wins over the saved one
        typer.echo(f"session: {r.session_id}", err=True)
        typer.echo(f"[fmchat] resumed {r.messages} messages: {r.restored} tokens from the KV snapshot ({r.snapshot}), "
                   f"{r.prefilled} prefilled", err=True)  # fmt: skip
    announced = conv.session_id
    backend = conv.backend
    # auto (docs/decode.md): the replies start at once, eagerly. Loading even a saved compiled step takes longer
    # than a short eager reply (measured 35-40 s to the first token against ~2 s), so run never waits for one before
    # its replies; without a saved step it compiles one after them, for the app and later runs.
    decode = backend.decode_status if isinstance(backend, BackgroundDecode) else None

    for i, text in enumerate(turns, 1):
        try:
            for ev in conv.turn(text):
                if conv.session_id != announced:
                    announced = conv.session_id
                    typer.echo(f"session: {announced}", err=True)
                if isinstance(ev, TextDelta) and not json_out:
                    sys.stdout.write(neutralize(ev.text))
                    sys.stdout.flush()
                    first_output()
                elif isinstance(ev, TurnDone):
                    if json_out:
                        print(json.dumps({"turn": i, "user": text, "reply": ev.reply, **ev.stats.to_dict()}), flush=True)
                    else:
                        sys.stdout.write("\n")
                        sys.stdout.flush()
                        typer.echo(stats_line(ev.stats), err=True)
                    first_output()  # (a reply with no text at all)
        except FmchatError as exc:  # the same error, saying which turn
            raise type(exc)(f"turn {i}: {exc}") from None
    if decode is not None and decode()["state"] == "compiling" and not decode()["cached_entry"]:
        typer.echo("[fmchat] compiling the decode step for the next launch (once per machine, model and options; "
                   "Ctrl+C skips it)", err=True)  # fmt: skip
        try:
            backend.wait_decode_step(progress=progress_printer())
        except KeyboardInterrupt:
            typer.echo("[fmchat] compile skipped: the next launch compiles again", err=True)
    conv.close()


# ---------------------------------------------------------------- chat (app or plain REPL)
REPL_HELP = "/quit  leave · /stats  show the last turn's stats · /reset  new conversation · /help  this line"


@app.command()
@with_config_options("chat")
def chat(
    plain: Annotated[bool, typer.Option("--plain", help="Line-mode REPL instead of the full-screen app.")] = False,
    save: Annotated[bool, typer.Option("--save/--no-save", help="--plain: save the conversation as a session.")] = True,
    **options,
) -> None:
    """Interactive chat: the full-screen app, or with --plain a line-mode REPL (Ctrl+C cancels a reply, /quit leaves)."""
    if not plain:
        launch_tui(options)
        return
    resume_gc = pause_gc()  # the imports and the load run without the cyclic collector (app.pause_gc)
    try:
        conv = open_conversation(run_config(options), save=save)
    finally:
        resume_gc()
    repl(conv)


def repl(conv) -> None:
    """The plain REPL over a Conversation (which saves each message as it happens)."""
    from rich.console import Console
    from rich.text import Text

    from fmchat.engine import TextDelta, TurnDone
    from fmchat.errors import describe
    from fmchat.text import neutralize

    out = Console(highlight=False)
    out.print(Text(f"fmchat · {conv.backend.model_name} · {REPL_HELP}", style="dim"))
    last = None
    announced = conv.session_id
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
            conv.new_chat()
            last = None
            out.print(Text("(new conversation)", style="dim"))
            continue
        if cmd == "/stats":
            s = last or conv.session.snapshot_stats()
            for k, v in s.to_dict().items():
                out.print(Text(f"  {k}: {v}"))
            continue

        events: queue.Queue = queue.Queue()

        def worker(text: str = line, events: queue.Queue = events) -> None:
            try:
                for ev in conv.turn(text):
                    events.put(ev)
            except Exception as exc:  # noqa: BLE001  reported to the user below, the REPL goes on
                events.put(exc)
            events.put(None)

        # During a reply Ctrl+C cancels the reply (the handler only sets a flag), not the program.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: conv.cancel())
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
                if conv.session_id != announced:
                    announced = conv.session_id
                    typer.echo(f"session: {announced}", err=True)
                if isinstance(ev, TextDelta):
                    out.print(Text(neutralize(ev.text)), end="")
                elif isinstance(ev, TurnDone):
                    last = ev.stats
                    out.print()
                    out.print(Text(stats_line(ev.stats), style="dim"))
                elif isinstance(ev, Exception):
                    out.print(Text(f"fmchat: error: {describe(ev)}", style="red"))
        finally:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- models
@app.command("models")
def models_cmd(json_out: JsonOpt = False) -> None:
    """List model aliases and whether each is available locally, and the GGUFs other tools keep (Ollama, LM Studio,
    llama.cpp, the Hugging Face cache) with the name --model takes for each."""
    from rich.console import Console
    from rich.table import Table

    from fmchat import model_stores, models

    found = model_stores.discover()
    rows = models.availability(found)
    if json_out:
        print(json.dumps({
            "aliases": [{"alias": r.alias.name, "description": r.alias.description, "hub_id": r.alias.hub_id, "available": r.available,
                         "where": r.where, "gguf": r.store.label if r.store else None} for r in rows],
            "gguf": [{"store": e.store, "name": e.name, "also": list(e.also), "size": e.size, "path": str(e.path),
                      "model": model_stores.gguf_general(e.path).get("general.name")} for e in found],
        }))  # fmt: skip
        return
    console = Console(highlight=False, width=max(140, Console().width))
    table = Table("alias", "model", "available")
    table.add_column("where", overflow="fold")
    for r in rows:
        shown = r.alias.name + (" (default)" if r.alias.name == models.DEFAULT_MODEL else "")
        table.add_row(shown, r.alias.description, "yes" if r.available else "no", r.where)
    console.print(table)
    if found:
        table = Table("store", "--model", "model (GGUF general.name)", "size", title="GGUF files other tools keep")
        table.add_column("path", overflow="fold")
        for e in found:
            table.add_row(e.store, e.name, str(model_stores.gguf_general(e.path).get("general.name") or ""), _size(e.size), str(e.path))
        console.print(table)
    else:
        where = "; ".join(f"{store}: {', '.join(map(str, paths))}" for store, paths in model_stores.roots().items())
        typer.echo(f"No GGUF files found in other tools' stores ({where}).")
    typer.echo("--model takes an alias, a name from the GGUF table, a local HF directory, a .gguf file, or a hub id (org/name).")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

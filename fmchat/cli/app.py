"""The typer app and its error handler: an FmchatError anywhere under a command becomes one line on stderr
(``fmchat: error: ...``) and the error's exit code; never a traceback."""

from __future__ import annotations

import atexit
import gc
import os

import typer
from typer.core import TyperGroup

from fmchat.errors import FmchatError

# fmchat shows its own progress; library tqdm bars (transformers' GGUF converter) would write over the app.
# tqdm reads this once, when it is first imported (torch imports it), so it is set before anything loads.
os.environ.setdefault("TQDM_DISABLE", "1")


class FmchatGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FmchatError as exc:
            typer.echo(f"fmchat: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=FmchatGroup,
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Chat with local language models and see what inference really costs.",
)
bench_app = typer.Typer(help="Benchmarks whose numbers the README quotes.", no_args_is_help=True)
sessions_app = typer.Typer(help="Saved conversations: list, show, export, import, remove.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(sessions_app, name="sessions")


def progress_printer(quiet: bool = False):
    """Load progress as ``[fmchat] step`` lines on stderr."""

    import re
    import time

    last = {"label": None, "fraction": 0.0, "at": 0.0}

    def progress(step: str, fraction: float | None = None) -> None:
        if quiet:
            return
        # A step that counts (``loading weights: 12/272 tensors``) is printed at 10% intervals (or every 2 s), not
        # once per tensor; its first and last line always.
        label = step.split(":")[0]
        now = time.monotonic()
        count = re.search(r"(\d+)/(\d+)\D*$", step)
        last_one = count is not None and count.group(1) == count.group(2)
        counting = fraction is not None and label == last["label"] and fraction < 1.0 and not last_one
        if counting and fraction - last["fraction"] < 0.1 and now - last["at"] < 2.0:
            return
        last.update(label=label, fraction=fraction or 0.0, at=now)
        typer.echo(f"[fmchat] {step}", err=True)

    return progress


def warn(message: str) -> None:
    typer.echo(f"fmchat: warning: {message}", err=True)


# Set by ``fmchat.cli.main`` (the console script): this process is fmchat's own, so the objects its launch creates may
# be frozen out of the garbage collector (not so in a test that calls the app in-process: freezing would keep its
# garbage cycles alive).
FREEZE_GC_AFTER_STARTUP = False


def pause_gc():
    """Switch the cyclic garbage collector off while a launch imports torch and transformers and loads the model;
    returns ``resume()`` (idempotent), to call once the launch is over (``run``: after the first streamed text).

    Importing torch and transformers creates some 400,000 tracked objects and almost no garbage (~9,000 unreachable
    objects, under 1 MiB). With the collector on, that growth set off 7 full collections, each traversing every
    object so far: ~0.9 s of the 4-5 s before the first token of ``fmchat run`` on the default model. ``resume``
    freezes what the launch made (``gc.freeze``: later collections skip it, as they would find it alive anyway)
    when the process is fmchat's own (``FREEZE_GC_AFTER_STARTUP``), then turns the collector back on."""
    if not gc.isenabled():
        return lambda: None
    gc.disable()
    resumed = False

    def resume() -> None:
        nonlocal resumed
        if resumed:
            return
        resumed = True
        if FREEZE_GC_AFTER_STARTUP:
            gc.freeze()
            # thawed again at exit: objects still frozen when the interpreter shuts down are never freed, and triton's
            # bindings (imported with transformers' modeling code) then report them ("nanobind: leaked 4 instances!")
            atexit.register(gc.unfreeze)
        gc.enable()

    return resume


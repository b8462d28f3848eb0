"""The typer app and its error handler: an FmchatError anywhere under a command becomes one line on stderr
(``fmchat: error: ...``) and the error's exit code; never a traceback."""

from __future__ import annotations

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

    def progress(step: str, fraction: float | None = None) -> None:
        if not quiet:
            typer.echo(f"[fmchat] {step}", err=True)

    return progress


def warn(message: str) -> None:
    typer.echo(f"fmchat: warning: {message}", err=True)

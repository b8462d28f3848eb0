"""Option types shared by the commands, and the chat options generated from ``RunConfig``.

``config_options(scope)`` turns every RunConfig field an entry point offers into a typer option (flag, help,
choices from the registries, bounds); ``with_config_options`` adds them to a command whose function takes
``**options``. Every option defaults to None = "not given", so a command can tell a flag the user typed
from a default: ``run`` lays the given ones over RunConfig's defaults, the app over the settings file.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated

import typer

from fmchat.config import RunConfig, option_fields
from fmchat.errors import UserError

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: one per physical core).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Alias, local HF dir, .gguf file or hub id.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens per reply.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
ScriptOpt = Annotated[Path | None, typer.Option("--script", help="Conversation JSON (default: the shared bench script).")]
TurnsOpt = Annotated[int | None, typer.Option("--turns", min=1, help="Use the first N turns of the script.")]

_TYPES = {"str | None": str, "str": str, "int | None": int, "int": int, "float": float, "bool": bool}


def _help(f) -> str:
    m = f.metadata
    text = m["help"]
    if m["choices"] is not None:
        text += f" One of: {m['choices'].help()}."
    default = None if f.default is MISSING else f.default
    if default is not None:
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        text += f" [default: {shown}]"
    return text


def config_options(scope: str = "chat") -> list[inspect.Parameter]:
    """One keyword parameter per RunConfig field the ``scope`` offers, defaulting to None (not given)."""
    params = []
    for f in option_fields(scope):
        m = f.metadata
        typ = _TYPES[str(f.type)]
        opt = typer.Option(*m["flags"], help=_help(f), min=m["min"], max=m["max"], show_default=False,
                           rich_help_panel="Chat options")  # fmt: skip
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[typ | None, opt]))
    return params


def with_config_options(scope: str = "chat"):
    """Give a command ``def cmd(..., **options)`` the generated chat options."""

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=own + config_options(scope))
        return fn

    return deco


def given(options: dict) -> dict:
    """The options the user typed (not None)."""
    return {k: v for k, v in options.items() if v is not None}


def run_config(options: dict, base: RunConfig | None = None) -> RunConfig:
    """The given options laid over ``base`` (default: RunConfig's defaults), validated."""
    return (base or RunConfig()).override(**given(options)).check()


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
    """The 'turns' of a conversation JSON file, or a one-line UserError."""
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

"""``fmchat sessions list|show|export|import|rm``: the saved conversations (fmchat.store)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fmchat.errors import UserError

from .app import sessions_app
from .options import JsonOpt


def open_store():
    from fmchat.store import Store

    return Store()


def _when(t: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


@sessions_app.command("list")
def sessions_list(
    search: Annotated[str | None, typer.Option("--search", "-s", help="Only sessions whose title or text contains this.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Saved sessions, newest first."""
    with open_store() as store:
        rows = store.list_sessions(search)
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

    with open_store() as store:
        rec = store.get(store.resolve(session_id))
    sys.stdout.write(neutralize(transcript.to_markdown(rec)))


@sessions_app.command("export")
def sessions_export(
    session_id: Annotated[str, typer.Argument(metavar="ID")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="md | json")] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE (0600) instead of stdout.")] = None,
) -> None:
    """Export a session as Markdown or as the versioned JSON transcript (docs/sessions.md)."""
    from fmchat.store import transcript

    if fmt not in ("md", "json"):
        raise UserError(f"--format {fmt}: use md or json")
    with open_store() as store:
        rec = store.get(store.resolve(session_id))
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
    typer.echo(f"wrote {output}", err=True)


@sessions_app.command("import")
def sessions_import(file: Annotated[Path, typer.Argument(metavar="FILE", help="A JSON transcript (fmchat sessions export --format json).")]) -> None:
    """Import a JSON transcript as a new session (its id kept unless taken); prints the id."""
    from fmchat.store import transcript

    try:
        rec = transcript.read_file(file)  # everything is checked before anything is written
    except transcript.TranscriptError as exc:
        raise UserError(f"import: {exc}; nothing was imported") from None
    with open_store() as store:
        sid = store.insert_record(rec)
    typer.echo(sid)


@sessions_app.command("rm")
def sessions_rm(session_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a session (and its KV snapshot)."""
    with open_store() as store:
        sid = store.delete(store.resolve(session_id))
    typer.echo(f"deleted {sid}", err=True)

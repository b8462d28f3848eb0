"""fmchat's command line (typer), as a package:

* ``app``       the typer app and the error handler (FmchatError -> one line, exit code)
* ``options``   shared option types, and the chat options generated from ``fmchat.config.RunConfig``
* ``chat``      ``fmchat`` (the app), ``run``, ``chat`` (app or ``--plain`` REPL), ``models``
* ``sessions``  ``fmchat sessions list|show|export|import|rm``
* ``bench``     ``fmchat bench ...``

Commands parse flags into a RunConfig, build the chat through ``fmchat.conversation`` and print what
comes back.
"""

from __future__ import annotations

from . import bench, chat, sessions  # noqa: F401  registers the commands
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]

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
    import importlib

    # the module, not the Typer app this package exports under the same name
    importlib.import_module(f"{__name__}.app").FREEZE_GC_AFTER_STARTUP = True  # see app.pause_gc
    try:
        app()
    except SystemExit as exc:
        _exit_past_a_compile(exc.code)
        raise


def _exit_past_a_compile(code) -> None:
    """After a compile of the decode step in this process, leave at once instead of through the interpreter's
    shutdown. A compile still under way (the app quit, ``run`` skipped it with Ctrl-C) cannot be stopped, and a
    shutdown under torch's trace aborts the process ("terminate called without an active exception", exit 134); after
    any compile, the teardown of triton's bindings (loaded by inductor) prints hundreds of "nanobind: leaked ..."
    lines. Nothing is lost by leaving at once (a compiled step is saved only when complete; the sessions store
    commits each write), so flush and exit with the same code."""
    import os
    import sys

    cc = sys.modules.get("fmchat.backends.transformers.compile_cache")
    if cc is None or not (cc.COMPILE_LOCK.locked() or "triton" in sys.modules):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed pipe: nothing more to say
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


__all__ = ["app", "main"]

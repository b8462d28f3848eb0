"""The entry points that open the app, from the real CLI: the app they build loads what the user typed, and
the panel's Running section shows it as the loaded backend reports it.

Each case runs the CLI (typer's CliRunner) with ``FmchatApp.run`` replaced by a catcher, then runs that very
app instance under pilot until the model is loaded, and reads the Running section back as text. Which flag
sets which setting, which panel row shows it and whether a backend honours it come from RunConfig's
metadata, the panel's row labels and the backend registry's capabilities, not from a second list here.
"""

from __future__ import annotations

import io
import re
import shlex
import time
from dataclasses import fields

import pytest
from rich.console import Console
from textual.widgets import Static
from typer.testing import CliRunner

from fmchat import models, registry
from fmchat import settings as settings_mod
from fmchat.cli import app as cli_app
from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp
from fmchat.tui.widgets.panel import RUNNING_LABELS

SIZE = (120, 40)

# Every CLI flag -> the RunConfig field it sets ("--kv-cache/--no-kv-cache" is two flags).
FLAG_FIELD = {flag: f.name for f in fields(RunConfig) for spec in f.metadata["flags"] for flag in spec.split("/")}

# What the loaded backend reports for a Running row (the rest come from the config the chat runs with).
REPORTED_BY_BACKEND = {"model": "model_name", "backend": "name", "device": "device", "dtype": "dtype",
                       "quant": "quant", "kernel": "kernel", "compile": "decode_path", "chat_template": "chat_template"}  # fmt: skip
# A backend that lacks the capability reports its own value for the setting (llama.cpp: its GGUF's quant, e.g. "Q4_1",
# kernel "llama.cpp", decode path "llamacpp") instead of the one typed.
CAPABILITY = {"quant": "quant", "kernel": "kernels", "compile": "compiled-step"}

# (command line as typed, model kind): "gguf" runs on the default model's GGUF, "tiny" on the tiny random Llama.
ENTRY_POINTS = [
    ("fmchat chat --backend llamacpp", "gguf"),
    ("fmchat --backend llamacpp --quant none", "gguf"),
    ("fmchat chat --quant int8 --kernel fmc --memory sliding --compile on", "tiny"),
]


def typed_settings(argv: list[str]) -> dict[str, str]:
    """The RunConfig fields the flags in ``argv`` set, with the values typed."""
    out = {}
    for i, arg in enumerate(argv):
        if arg in FLAG_FIELD:
            out[FLAG_FIELD[arg]] = argv[i + 1]
    return out


def running_rows(app) -> dict[str, str]:
    """The panel's Running section as text, one row per label (rendered wide: no value folds)."""
    table = app.query_one("#sec-running", Static).content
    console = Console(width=200, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(table)
    rows = {}
    for line in cap.get().splitlines():
        for field, label in RUNNING_LABELS.items():
            if m := re.match(rf"{re.escape(label)}\s+(\S.*)$", line.rstrip()):
                rows[field] = m.group(1)
    return rows


def expected_text(field: str, app) -> str:
    """What the Running row of ``field`` must say: the loaded backend's report, or the chat's config."""
    conv = app.conversation
    if field in REPORTED_BY_BACKEND:
        return str(getattr(conv.backend, REPORTED_BY_BACKEND[field]))
    value = getattr(conv.config, field)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def honours(backend_name: str, field: str) -> bool:
    cap = CAPABILITY.get(field)
    return cap is None or cap in registry.BACKENDS.entry(backend_name).capabilities


def typed_shows_as(field: str, typed: str, shown: str) -> bool:
    """Whether the row text ``shown`` is the value ``typed`` (as a backend that honours it reports it)."""
    if field == "model":
        return shown == models.resolve(typed).name
    if field == "compile":  # the decode path as loaded: "eager", or "compiled (<backend>, <seconds> s)"
        return shown.startswith("compiled (") if typed == "on" else shown == "eager"
    return shown == typed


@pytest.fixture
def no_settings_file():
    path = settings_mod.settings_path()
    path.unlink(missing_ok=True)
    yield
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("command, model", ENTRY_POINTS, ids=[c for c, _ in ENTRY_POINTS])
async def test_entry_point_opens_the_app_with_the_typed_settings(command, model, default_gguf, tiny_model, monkeypatch,
                                                                 no_settings_file):  # fmt: skip
    built: list[FmchatApp] = []
    monkeypatch.setattr(FmchatApp, "run", lambda self, *a, **kw: built.append(self))
    argv = shlex.split(command)[1:]  # without the program name
    if model == "gguf":
        argv += ["--model", str(default_gguf)]
    else:
        argv += ["--model", str(tiny_model), "--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(cli_app, argv)
    assert result.exit_code == 0, result.output
    assert len(built) == 1
    app = built[0]
    typed = typed_settings(argv)
    for field, value in typed.items():  # the app was built with what was typed
        assert str(getattr(app.settings, field)) == value, field
        assert app.cli_overrides[field] == getattr(app.settings, field)

    t0 = time.perf_counter()
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(30000):
            if app.ready or app.state.name == "NO_MODEL":
                break
            await pilot.pause(0.01)
        assert app.ready, [str(n.render()) for n in app.query("Note")]
        loaded_s = time.perf_counter() - t0
        await pilot.pause()
        rows = running_rows(app)
        assert set(rows) == set(RUNNING_LABELS), rows
        # Every row shows what is loaded (the backend's own report) and how the chat runs.
        for field in RUNNING_LABELS:
            shown = rows[field].split(" (")[0] if field == "kv_cache" else rows[field]  # "on (reused across turns)"
            assert shown == expected_text(field, app), (field, rows)
        # Every setting typed shows as typed, where the loaded backend honours it.
        backend = app.conversation.backend
        assert rows["backend"] == typed.get("backend", "transformers")
        for field, value in typed.items():
            if field in RUNNING_LABELS and honours(backend.name, field):
                assert typed_shows_as(field, value, rows[field]), (field, value, rows[field])
        if backend.name == "llamacpp":
            assert rows["quant"] == rows["dtype"] and rows["kernel"] == "llama.cpp"  # the GGUF's own quantization
            assert re.fullmatch(r"(Q\d\w*|F16|F32|BF16)", rows["dtype"]), rows["dtype"]  # the GGUF's file type
        print(f"{command}: loaded in {loaded_s:.1f} s; running: {rows}")

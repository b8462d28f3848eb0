"""Snapshots of the main screen and the settings pane (pytest-textual-snapshot), on the tiny model.

Deterministic: fixed terminal size, a model directory with a fixed name, no turn run (no timings), volatile
memory figures masked by the app's ``mask_volatile`` switch, cursor blinking off. Update the baselines with
``pytest tests/test_tui_snapshots.py --snapshot-update`` after a deliberate change, and look at them.
"""

from __future__ import annotations

import shutil

import pytest

from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp

SIZE = (120, 40)


@pytest.fixture(scope="module")
def snap_model(tiny_model, tmp_path_factory):
    dest = tmp_path_factory.mktemp("snap") / "tiny-llama"
    shutil.copytree(tiny_model, dest)
    return dest


def make_app(model, monkeypatch) -> FmchatApp:
    # A relative path, so no temporary directory name shows up in the settings pane.
    monkeypatch.chdir(model.parent)
    s = RunConfig(model=f"./{model.name}", device="cpu", dtype="float32", temperature=0.0, seed=0, max_new_tokens=8)
    return FmchatApp(s, persist=False, mask_volatile=True)


async def settle(pilot) -> None:
    app = pilot.app
    for _ in range(3000):
        if app.ready:
            break
        await pilot.pause(0.01)
    assert app.ready
    for widget in app.screen.query("Input, TextArea"):
        widget.cursor_blink = False
    await pilot.pause()


def test_main_screen(snap_compare, snap_model, monkeypatch):
    assert snap_compare(make_app(snap_model, monkeypatch), terminal_size=SIZE, run_before=settle)


def test_settings_pane(snap_compare, snap_model, monkeypatch):
    async def open_settings(pilot):
        await settle(pilot)
        await pilot.press("f2")
        await pilot.pause()
        await settle(pilot)
        # The pane is generated from RunConfig (many rows): wait until its layout has settled, so the
        # scrollbar is drawn for the whole form on a slow machine too.
        form = pilot.app.screen.query_one("#settings-form")
        sizes = []
        for _ in range(300):
            sizes.append(form.virtual_size)
            if len(sizes) >= 5 and len(set(sizes[-5:])) == 1:
                break
            await pilot.pause(0.01)
        await pilot.pause()

    assert snap_compare(make_app(snap_model, monkeypatch), terminal_size=SIZE, run_before=open_settings)

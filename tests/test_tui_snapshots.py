"""Snapshots of the main screen and the settings pane at 120x40, and of the main, settings and sessions screens
in an 80x24 terminal (pytest-textual-snapshot), on the tiny model.

Deterministic: fixed terminal size, a model directory with a fixed name, no turn run (no timings), volatile
memory figures masked by the app's ``mask_volatile`` switch, cursor blinking off. Update the baselines with
``pytest tests/test_tui_snapshots.py --snapshot-update`` after a deliberate change, and look at them.
"""

from __future__ import annotations

import shutil
from datetime import datetime

import pytest

from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp

SIZE = (120, 40)
SMALL = (80, 24)


@pytest.fixture(scope="module")
def snap_model(tiny_model, tmp_path_factory):
    dest = tmp_path_factory.mktemp("snap") / "tiny-llama"
    shutil.copytree(tiny_model, dest)
    return dest


def make_app(model, monkeypatch, store=None) -> FmchatApp:
    # A relative path, so no temporary directory name shows up in the settings pane.
    monkeypatch.chdir(model.parent)
    # The eager decode path: no compile in the background, whose progress would show in the load line.
    s = RunConfig(model=f"./{model.name}", device="cpu", dtype="float32", temperature=0.0, seed=0, max_new_tokens=8,
                  compile="eager")  # fmt: skip
    return FmchatApp(s, persist=False, mask_volatile=True, store=store)


async def settle_form(pilot) -> None:
    """The settings pane is generated from RunConfig (many rows): wait until its layout has settled, so the
    scrollbar is drawn for the whole form on a slow machine too."""
    form = pilot.app.screen.query_one("#settings-form")
    sizes = []
    for _ in range(300):
        sizes.append(form.virtual_size)
        if len(sizes) >= 5 and len(set(sizes[-5:])) == 1:
            break
        await pilot.pause(0.01)
    await pilot.pause()


async def open_settings(pilot) -> None:
    await settle(pilot)
    await pilot.press("f2")
    await pilot.pause()
    await settle(pilot)
    await settle_form(pilot)


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
    assert snap_compare(make_app(snap_model, monkeypatch), terminal_size=SIZE, run_before=open_settings)


# An 80x24 terminal: the panel down to one line, the key bar with the keys that matter, a settings pane with a
# line per field, a sessions list without the model column.
def test_main_screen_80x24(snap_compare, snap_model, monkeypatch):
    assert snap_compare(make_app(snap_model, monkeypatch), terminal_size=SMALL, run_before=settle)


def test_settings_pane_80x24(snap_compare, snap_model, monkeypatch):
    assert snap_compare(make_app(snap_model, monkeypatch), terminal_size=SMALL, run_before=open_settings)


def test_sessions_screen_80x24(snap_compare, snap_model, monkeypatch, tmp_path):
    from fmchat.store import Store
    from fmchat.store.records import SessionRecord, StoredMessage

    store = Store(tmp_path / "sessions.db")
    titles = ["Why do puffins nest in burrows on steep sea cliffs instead of on the open ground?",
              "Plan a three-day walk along the coast", "hello"]  # fmt: skip
    for day, title in enumerate(titles, start=1):
        t = datetime(2026, 3, day, 9, 30).timestamp()  # local time: the list shows 03-0N 09:30 anywhere
        msgs = [StoredMessage("user", title, t), StoredMessage("assistant", "…", t)]
        store.insert_record(SessionRecord(id=f"s{day}", title=title, created=t, updated=t, model="smollm2-135m",
                                          backend="transformers", messages=msgs))  # fmt: skip

    async def open_sessions(pilot):
        await settle(pilot)
        await pilot.press("f4")
        await pilot.pause()
        await settle(pilot)

    app = make_app(snap_model, monkeypatch, store=store)
    assert snap_compare(app, terminal_size=SMALL, run_before=open_sessions)

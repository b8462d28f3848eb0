"""Saved sessions in the Textual app, under pilot on the tiny model: autosave, the sessions screen
(list, search, rename, delete with confirmation, new chat, open), --session restore, palette commands."""

from __future__ import annotations

from conftest import make_session
from test_tui import SIZE, ready, screen_text, send, tiny_settings, turn_done, wait_for

from fmchat.store import Recorder, Store, kvsnap
from fmchat.tui.app import FmchatApp
from fmchat.tui.screens.sessions import ConfirmScreen, RenameScreen, SessionsScreen, SessionTable
from fmchat.tui.widgets.chat import AssistantMessage, ChatInput, Note, UserMessage


def notes(app) -> str:
    return "\n".join(str(n.render()) for n in app.query(Note))


async def test_chat_is_saved_and_the_sessions_screen_lists_searches_renames_deletes(tiny_model, tmp_path):
    db = tmp_path / "sessions.db"
    app = FmchatApp(tiny_settings(tiny_model), persist=False, store=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Tell me about penguins")
        await turn_done(pilot, 1)
        await send(pilot, "And puffins?")
        await turn_done(pilot, 2)
        first = app.current_session_id
        assert first is not None
        saved = app.store.get(first)
        assert [m.content for m in saved.messages] == [m.content for m in app.session.messages]
        assert saved.title == "Tell me about penguins" and saved.messages[1].stats["generated_tokens"] > 0
        assert kvsnap.snapshot_path(app.store, first).is_file()

        # A second chat, via the screen's "new chat".
        await pilot.press("f4")
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, SessionsScreen) and not app.session.messages
        await send(pilot, "Something about llamas")
        await turn_done(pilot, 1)
        second = app.current_session_id
        assert second != first

        await pilot.press("f4")
        screen = app.screen
        assert isinstance(screen, SessionsScreen)
        table = screen.query_one(SessionTable)
        assert [r.id for r in screen.rows] == [second, first]  # newest first
        assert table.row_count == 2
        cells = [str(c) for c in table.get_row(first)]
        assert cells[0] == "Tell me about penguins" and cells[1] == tiny_model.name and cells[3] == "4"
        shown = screen_text(app)
        for what in (
            "Title",
            "Model",
            "Updated",
            "Messages",
            "Tell me about penguins",
            "Something about llamas",
            "2 sessions",
        ):
            assert what in shown, what

        # Search by message text.
        await pilot.press("slash")
        await pilot.press(*"puffin")
        await pilot.pause()
        assert [r.id for r in screen.rows] == [first]
        await pilot.press("enter")  # from the search box to the list
        assert isinstance(app.focused, SessionTable)

        # Rename.
        await pilot.press("r")
        assert isinstance(app.screen, RenameScreen)
        app.screen.query_one("#rename-input").value = "Seabirds"
        await pilot.press("enter")
        await pilot.pause()
        assert app.store.get(first).title == "Seabirds"
        assert str(table.get_row(first)[0]) == "Seabirds"

        # Delete: asked first; "n" keeps it, "y" deletes it.
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert len(app.store.list_sessions()) == 2
        await pilot.press("d")
        await pilot.press("y")
        await pilot.pause()
        assert [s.id for s in app.store.list_sessions()] == [second]
        assert not kvsnap.snapshot_path(app.store, first).exists()
        screen.query_one("#sessions-search").value = ""
        await pilot.pause()
        assert [r.id for r in screen.rows] == [second]
        await pilot.press("escape")
        assert not isinstance(app.screen, SessionsScreen)


async def test_open_a_saved_session_from_the_screen_and_continue(tiny_model, tmp_path):
    db = tmp_path / "sessions.db"
    store = Store(db)
    s = make_session(tiny_model, max_new_tokens=8)
    rec = Recorder(store, spec=str(tiny_model))
    s.run_turn("Remember the word apricot.")
    rec.sync(s)
    store.close()
    app = FmchatApp(tiny_settings(tiny_model), persist=False, store=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f4")
        await pilot.pause()
        assert isinstance(app.focused, SessionTable)
        await pilot.press("enter")
        await wait_for(
            pilot, lambda: not app.restoring and app.current_session_id == rec.session_id, "session restored"
        )
        assert [w.text for w in app.query(UserMessage)] == ["Remember the word apricot."]
        assert [w.text for w in app.query(AssistantMessage)] == [s.messages[1].content]
        assert "KV snapshot not used: no snapshot" in notes(app)  # none was saved: it was prefilled
        cached = len(app.session.ledger)
        assert cached == app.session.backend.cached_tokens() > 0
        assert app.load_steps[-1] == f"restoring the session: prefilled {cached}/{cached} tokens"  # the progress shown
        await send(pilot, "Which word?")
        await turn_done(pilot, 2)
        assert app.session.messages[-1].stats.reused_tokens == cached  # the restore did the prefill
        assert len(app.store.get(rec.session_id).messages) == 4


async def test_session_flag_restores_from_the_kv_snapshot(tiny_model, tmp_path):
    db = tmp_path / "sessions.db"
    store = Store(db)
    s = make_session(tiny_model, max_new_tokens=8)
    rec = Recorder(store, spec=str(tiny_model))
    s.run_turn("Hello there")
    rec.sync(s)
    kvsnap.save(store, rec.session_id, s)
    expected = s.run_turn("Again?").reply  # what the continuous chat says next (greedy)
    store.close()
    app = FmchatApp(tiny_settings(tiny_model), persist=False, store=db, session_id=rec.session_id)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(ChatInput).text = "Again?"
        await pilot.press("enter")  # typed before the restore finished: it waits, then goes out
        await wait_for(pilot, lambda: app.ready and not app.restoring, "restored")
        await turn_done(pilot, 2)
        assert "tokens from the KV snapshot" in notes(app)
        assert app.session.messages[-1].content == expected
        assert [m.role for m in app.store.get(rec.session_id).messages] == ["user", "assistant"] * 2


async def test_palette_has_the_session_commands(tiny_model, tmp_path):
    app = FmchatApp(tiny_settings(tiny_model), persist=False, store=tmp_path / "s.db")
    async with app.run_test(size=SIZE) as pilot:
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Sessions", "Search sessions", "Open session", "Rename session", "Delete session", "New chat"} <= titles
        await ready(pilot)
        await send(pilot, "Name me")
        await turn_done(pilot, 1)
        app.action_rename_session()
        await pilot.pause()
        assert isinstance(app.screen, RenameScreen)
        app.screen.query_one("#rename-input").value = "Named"
        await pilot.press("enter")
        assert app.store.get(app.current_session_id).title == "Named"
        sid = app.current_session_id
        app.action_delete_session()
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert app.store.list_sessions() == [] and app.current_session_id is None
        app.action_search_sessions()
        await pilot.pause()
        assert isinstance(app.screen, SessionsScreen) and app.focused.id == "sessions-search"
        assert sid not in [r.id for r in app.screen.rows]


async def test_a_store_that_cannot_be_opened_is_a_note_and_the_chat_goes_on_unsaved(tiny_model, tmp_path):
    db = tmp_path / "sessions.db"
    db.write_text("not a database, just text long enough to look like a header")
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=2), persist=False, store=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.store is None and app.conversation.save is False
        assert "sessions are not saved: the session store" in notes(app)
        await send(pilot, "Still here?")
        await turn_done(pilot, 1)
        assert app.current_session_id is None  # nothing was saved, and nothing failed
        assert "could not save" not in notes(app)
        await pilot.press("f4")
        await pilot.pause()
        assert isinstance(app.screen, SessionsScreen) and "sessions are not being saved" in screen_text(app)
    assert db.read_text().startswith("not a database")

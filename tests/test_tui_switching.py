"""Flipping backend, kernel and quantization from the settings pane mid-conversation, and the memory marker."""

from __future__ import annotations

import json

from test_tui import SIZE, ready, screen_text, send, tiny_settings, turn_done, wait_for
from textual.widgets import Input

from fmchat.config import RunConfig
from fmchat.tui.app import FmchatApp
from fmchat.tui.screens.settings import ChoiceSet, SettingsScreen
from fmchat.tui.widgets.chat import Note
from fmchat.tui.widgets.panel import InferencePanel


async def open_settings(pilot):
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen), "settings open")
    return pilot.app.screen


def choose(screen, kind: str, value: str) -> None:
    box = screen.query_one(f"#set-{kind}", ChoiceSet)
    button = next(b for b, c in zip(box.query("RadioButton"), box.choices) if c.value == value)
    assert not button.disabled, f"{kind}={value} is disabled: {button.label}"
    button.value = True


async def apply_and_reload(pilot, screen) -> None:
    app = pilot.app
    before = app.session.backend
    await pilot.pause()
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: app.session.backend is not before and app.ready, "reloaded", steps=12000)


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


async def test_conversation_moves_from_transformers_to_llamacpp(default_gguf):
    app = FmchatApp(RunConfig(device="cpu", temperature=0.0, seed=0, max_new_tokens=12), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.session.backend.name == "transformers"
        await send(pilot, "What is the capital of France?")
        await turn_done(pilot, 1)
        screen = await open_settings(pilot)
        choose(screen, "backend", "llamacpp")
        await apply_and_reload(pilot, screen)
        assert app.session.backend.name == "llamacpp"
        assert any("carries on" in n for n in notes(app))
        await send(pilot, "And of Italy?")
        await turn_done(pilot, 2)
        last = app.session.messages[-1]
        assert last.stats.generated_tokens > 0 and last.content
        # the whole transcript was prefilled on llama.cpp: the first exchange is in its cache now
        assert last.stats.reused_tokens == 0 and last.stats.prompt_tokens > 40
        st = app.query_one(InferencePanel).state
        assert st.backend == "llamacpp" and st.dtype == "Q4_1"
        assert [m.role for m in app.session.messages] == ["user", "assistant", "user", "assistant"]


async def test_kernel_and_quant_switches_move_the_numbers(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, dtype="bfloat16"), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await turn_done(pilot, 1)
        panel = app.query_one(InferencePanel)
        bf16_weights = panel.state.weights_bytes
        screen = await open_settings(pilot)
        choose(screen, "kernel", "fmc")
        choose(screen, "quant", "int8")
        await apply_and_reload(pilot, screen)
        b = app.session.backend
        assert b.kernel == "fmc" and b.quant == "int8"
        await send(pilot, "Again")
        await turn_done(pilot, 2)
        st = panel.state
        assert st.kernel == "fmc" and st.quant == "int8"
        # the embedding and the linear layers drop to int8; this tiny model's untied output head stays bf16
        assert st.weights_bytes == b.weights_bytes() < 0.8 * bf16_weights
        # the fmc cache is preallocated for the whole window (K and V, every layer, bf16); seq_lens is its fill
        cfg = json.loads((tiny_model / "config.json").read_text())
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
        assert st.seq_lens == [st.ctx_used] and st.kv_bytes == per_token * st.ctx_size
        text = screen_text(app)
        assert "fmc" in text and "int8" in text


async def test_memory_policy_leaves_a_marker_in_the_chat(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, ctx=160, max_new_tokens=16, memory="shift"), persist=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for i in range(7):
            await send(pilot, f"Turn {i}: tell me about the sea and the sky.")
            await turn_done(pilot, i + 1)
        marks = [n for n in notes(app) if "memory policy 'shift'" in n]
        assert marks and "shifted out of the KV cache" in marks[0]
        assert all(m.stats.ctx_used <= 160 for m in app.session.messages if m.stats)
        st = app.query_one(InferencePanel).state
        assert st.ctx_used <= 160 and st.memory_policy == "shift" and "shifted" in st.memory_last
        assert "last drop" in screen_text(app)
        screen = await open_settings(pilot)
        screen.query_one("#set-ctx", Input).value = "160"
        choose(screen, "memory", "none")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.session.config.memory == "none"


async def test_conversation_moves_to_an_openai_compatible_server(tiny_model):
    from test_backends import Script, sse, toy_server

    script = Script((200, sse("Served ", "reply.", usage={"prompt_tokens": 40, "completion_tokens": 2})))
    srv, url = toy_server(script)
    try:
        app = FmchatApp(tiny_settings(tiny_model), persist=False)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await send(pilot, "Hello")
            await turn_done(pilot, 1)
            screen = await open_settings(pilot)
            assert "openai — needs a server URL" in screen_text(app)  # no server URL yet: disabled, with the reason
            screen.query_one("#set-base_url", Input).value = url
            await pilot.pause()
            choose(screen, "backend", "openai")  # the URL typed in makes it a choice
            await apply_and_reload(pilot, screen)
            assert app.session.backend.name == "openai"
            await send(pilot, "And now?")
            await turn_done(pilot, 2)
            assert app.session.messages[-1].content == "Served reply."
            sent = json.loads(script.bodies[-1])["messages"]
            assert [m["content"] for m in sent if m["role"] == "user"] == ["Hello", "And now?"]  # transcript carried over
            st = app.query_one(InferencePanel).state
            assert st.backend == "openai" and st.kv_bytes is None and "n/a" in screen_text(app)
    finally:
        srv.shutdown()

"""Flag parity: every chat option of ``run`` is accepted by ``fmchat``, ``fmchat chat`` and ``fmchat chat --plain``, and
reaches the loaded chat. The options and their non-default values come from RunConfig and the registries, so a field
added there is checked here without editing this file."""

from __future__ import annotations

import asyncio
from dataclasses import fields

import pytest
import torch
from typer.testing import CliRunner

from fmchat import config as config_mod
from fmchat.cli import app as cli_app
from fmchat.config import RunConfig

runner = CliRunner()

# Values that a test machine can load (first choice of each registry that is not the default and is available
# here would pick e.g. "cuda"; these are the ones to prefer when they are offered).
PREFERRED = {"quant": "int8", "kernel": "fmc", "compile": "on", "memory": "sliding", "device": "cpu", "dtype": "float32"}
PLAIN = {"system": "Be brief.", "max_new_tokens": 3, "temperature": 0.25, "top_p": 0.5, "seed": 7, "ctx": 192, "threads": 1,
         "gpu_layers": 1, "base_url": "http://127.0.0.1:9/v1", "api_model": "other-name", "kv_cache": False, "kv_snapshot_cap": 64,
         "chat_template": "chatml"}  # fmt: skip
ENTRY_POINTS = {"run": ["run", "--no-save"], "chat --plain": ["chat", "--plain", "--no-save"], "chat": ["chat"], "fmchat": []}


def non_default_values(model: str) -> dict:
    """A value different from the default for every chat option: from the registries, or PLAIN."""
    values = {}
    for f in config_mod.option_fields("chat"):
        if f.name == "model":
            values[f.name] = model
        elif f.name == "backend":
            continue  # the other backends need another model or a server: test_backend_flag_reaches_each_entry_point
        elif f.metadata["choices"] is not None:
            usable = [c.value for c in f.metadata["choices"].choices() if c.available and c.value != f.default]
            values[f.name] = PREFERRED[f.name] if PREFERRED.get(f.name) in usable else usable[0]
        else:
            values[f.name] = PLAIN[f.name]
    return values


def as_args(values: dict) -> list[str]:
    args = []
    for name, value in values.items():
        flags = config_mod.field_info(name).metadata["flags"]
        if isinstance(value, bool):
            on, _, off = flags[0].partition("/")
            args.append(on if value else off)
        else:
            args += [flags[0], str(value)]
    return args


def check_reached(conv, values: dict) -> None:
    """Each value is in the chat's config, and where the loaded chat shows it, there too."""
    b, s = conv.backend, conv.session
    for name, value in values.items():
        assert getattr(conv.config, name) == value, name
    shown = {
        "backend": b.name, "quant": b.quant, "kernel": b.kernel, "device": b.device, "dtype": b.dtype, "ctx": s.ctx_size,
        "kv_cache": s.config.kv_cache, "memory": s.config.memory, "system": s.config.system,
        "max_new_tokens": s.config.gen.max_new_tokens, "temperature": s.config.gen.temperature,
        "top_p": s.config.gen.top_p, "seed": s.config.gen.seed, "threads": torch.get_num_threads(),
        "chat_template": b.chat_template.split(" (")[0],
    }  # fmt: skip
    for name, value in values.items():
        if name in shown:
            assert shown[name] == value, (name, shown[name], value)
    if "compile" in values:
        assert b.decode_path.startswith("compiled"), b.decode_path


def loaded_chat(entry: str, args: list[str], monkeypatch) -> object:
    """Run an entry point with ``args`` and return the Conversation it loaded."""
    import fmchat.cli.chat as cli_chat

    opened = []
    real = cli_chat.open_conversation

    def spy(*a, **kw):
        opened.append(real(*a, **kw))
        return opened[-1]

    monkeypatch.setattr(cli_chat, "open_conversation", spy)
    if entry in ("run", "chat --plain"):
        extra = ["Hi"] if entry == "run" else []
        r = runner.invoke(cli_app, [*ENTRY_POINTS[entry], *args, *extra], input="/quit\n")
        assert r.exit_code == 0, r.output
        assert len(opened) == 1
        return opened[0]
    from fmchat.tui.app import FmchatApp

    apps = []
    monkeypatch.setattr(FmchatApp, "run", lambda self, *a, **kw: apps.append(self))
    r = runner.invoke(cli_app, [*ENTRY_POINTS[entry], *args])
    assert r.exit_code == 0, r.output
    app = apps[0]

    async def load():
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(6000):  # bounded by steps (10 min), not by a short clock: a loaded CI machine compiles slowly
                if app.conversation is not None and app.conversation.loaded and not app.loading:
                    break
                await pilot.pause(0.1)
            return app.conversation

    return asyncio.run(load())


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_chat_flag_reaches_the_loaded_chat(entry, tiny_model, monkeypatch):
    values = non_default_values(str(tiny_model))
    assert set(values) | {"backend"} == {f.name for f in config_mod.option_fields("chat")}
    conv = loaded_chat(entry, as_args(values), monkeypatch)
    assert conv is not None, "the chat did not load"
    check_reached(conv, values)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_backend_flag_reaches_each_entry_point(entry, default_gguf, monkeypatch):
    conv = loaded_chat(entry, ["--backend", "llamacpp", "--model", str(default_gguf), "--max-new-tokens", "2"], monkeypatch)
    assert conv.backend.name == "llamacpp" and conv.config.backend == "llamacpp"


def test_the_app_only_options_are_the_app_scope_fields():
    app_only = {f.name for f in config_mod.option_fields("app")} - {f.name for f in config_mod.option_fields("chat")}
    assert app_only == {f.name for f in fields(RunConfig) if f.metadata["scope"] == "app" and f.metadata["flags"]}
    r = runner.invoke(cli_app, ["run", "--theme", "fmchat-light", "Hi"])
    assert r.exit_code == 2  # run has no app options


def test_a_bad_choice_is_one_line_through_every_entry_point():
    for entry, prefix in ENTRY_POINTS.items():
        r = runner.invoke(cli_app, [*prefix, "--quant", "int3", *(["Hi"] if entry == "run" else [])])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and lines == ["fmchat: error: unknown quantization 'int3' (choices: none, bf16, fp16, int8, int4, log8)"], (entry, r.output)

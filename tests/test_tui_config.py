"""Settings file, the choice registries, theme files and the CLI's TUI flags (no terminal needed, except one pilot run)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fmchat import registry
from fmchat import settings as settings_mod
from fmchat.cli import app as cli_app
from fmchat.config import CHOICE_FIELDS, RunConfig, choices
from fmchat.paths import config_dir
from fmchat.tui import themes


def test_settings_round_trip_and_overrides(tmp_path):
    path = tmp_path / "settings.toml"
    assert settings_mod.load(path) == RunConfig()  # no file: defaults
    s = RunConfig(model="phi-3.5", kernel="eager", kv_cache=False, ctx=1024, temperature=0.2, seed=7, system="Be brief.")
    settings_mod.save(s, path)
    assert settings_mod.load(path) == s
    # CLI flags (non-None) win over the file; None leaves the file's value.
    merged = settings_mod.load(path).override(model="qwen2.5-0.5b", ctx=None, theme="fmchat-light")
    assert merged.model == "qwen2.5-0.5b" and merged.ctx == 1024 and merged.theme == "fmchat-light"
    # Unknown keys (another version) are ignored; a broken file is a clear error.
    path.write_text('future_key = 1\ntemperature = 1\n')
    assert settings_mod.load(path).temperature == 1.0
    path.write_text("temperature = = 1")
    with pytest.raises(settings_mod.SettingsError, match="cannot read settings file"):
        settings_mod.load(path)


def test_settings_validate_reports_each_problem():
    bad = RunConfig(backend="nope", top_p=2.0, max_new_tokens=0, memory="forget")
    problems = bad.validate()
    assert any("unknown backend 'nope'" in p for p in problems)
    assert any("top-p" in p for p in problems)
    assert any("max new tokens" in p for p in problems)
    assert any("memory policy 'forget'" in p for p in problems)
    assert RunConfig().validate() == []


def test_registry_lists_every_kind_with_reasons():
    for kind in CHOICE_FIELDS:
        cs = choices(kind)
        assert cs and cs[0].available  # the first choice (the default path) always works
        for c in cs:
            assert c.available or c.reason, (kind, c)
    assert registry.BACKENDS.check("openai") is None  # selectable; it needs a server URL (checked by RunConfig)
    assert "needs a server URL" in RunConfig(backend="openai").validate()[0]
    assert RunConfig(backend="openai", base_url="http://127.0.0.1:9/v1").validate() == []
    assert "must start with http" in RunConfig(backend="openai", base_url="ftp://x").validate()[0]
    assert registry.BACKENDS.check("vllm-direct") is not None  # unknown: says which choices exist


def test_shipped_and_user_themes_load():
    loaded = themes.load_themes()
    names = {t.name for t in loaded.themes}
    assert {"fmchat-dark", "fmchat-light", "fmchat-high-contrast"} <= names
    assert loaded.problems == []
    user = themes.user_dir()
    user.mkdir(parents=True, exist_ok=True)
    (user / "mine.toml").write_text('name = "my-theme"\nprimary = "#ff8800"\ndark = true\n')
    (user / "broken.toml").write_text('name = "x"\nprimry = "#000"\n')
    try:
        loaded = themes.load_themes()
        assert "my-theme" in {t.name for t in loaded.themes}
        assert any("broken.toml" in p and "primry" in p for p in loaded.problems)
    finally:
        (user / "mine.toml").unlink()
        (user / "broken.toml").unlink()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "unknown backend 'nope'"),
        (["--backend", "openai"], "needs a server URL"),
        (["--backend", "openai", "--base-url", "ftp://x"], "must start with http"),
        (["--theme", "no-such-theme"], "unknown theme 'no-such-theme'"),
        (["--model", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
        (["--kernel", "magic"], "unknown attention kernel 'magic'"),
    ],
)
def test_bad_tui_flags_exit_2_with_one_line(args, message):
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fmchat: error:") and message in lines[0], result.output


def test_broken_settings_file_is_one_line_error():
    path = settings_mod.settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[[[")
    try:
        result = CliRunner().invoke(cli_app, [])
        assert result.exit_code == 2 and "cannot read settings file" in result.output
    finally:
        path.unlink()


async def test_theme_switch_applies_and_persists_without_cli_flags(tiny_model):
    from fmchat.tui.app import FmchatApp

    path = settings_mod.settings_path()
    path.unlink(missing_ok=True)
    file_settings = RunConfig(device="cpu", dtype="float32")
    # Launched as `fmchat --model TINY --theme fmchat-light`: the flags are not written to the file...
    flags = {"model": str(tiny_model), "theme": "fmchat-light"}
    app = FmchatApp(file_settings.override(**flags), file_settings=file_settings, cli_overrides=flags)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.theme == "fmchat-light"
        assert {"fmchat-dark", "fmchat-high-contrast"} <= set(app.available_themes)
        for _ in range(3000):
            if app.ready:
                break
            await pilot.pause(0.01)
        assert settings_mod.load(path).model is None
        assert settings_mod.load(path).theme == "fmchat-dark"
        # ...but a theme picked in the app is (the palette's Theme command sets app.theme the same way).
        app.theme = "fmchat-high-contrast"
        await pilot.pause()
    assert settings_mod.load(path).theme == "fmchat-high-contrast"
    assert settings_mod.load(path).model is None
    assert config_dir() in path.parents

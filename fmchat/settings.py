"""The settings file: the saved subset of ``RunConfig`` (fields marked ``saved``) as TOML in the platformdirs
config dir. The app reads it at start and writes it when the user changes a setting; CLI flags lay over it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from fmchat.config import DEFAULT_THEME, RunConfig
from fmchat.errors import SettingsError
from fmchat.paths import config_dir

__all__ = ["DEFAULT_THEME", "SettingsError", "load", "save", "settings_path"]


def settings_path() -> Path:
    return config_dir() / "settings.toml"


def load(path: Path | None = None) -> RunConfig:
    """Settings from the TOML file; defaults when there is none. A broken file raises SettingsError."""
    path = path or settings_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RunConfig()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
    return RunConfig.from_saved(data)


def save(config: RunConfig, path: Path | None = None) -> Path:
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(config.to_saved()), encoding="utf-8")
    tmp.replace(path)
    return path

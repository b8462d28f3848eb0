"""Theme files: the repository's top-level ``themes/`` folder (shipped with the package) and the user's own.

A theme file is TOML with the fields of ``textual.theme.Theme``; see themes/README.md.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from textual.theme import Theme

from fmchat.paths import config_dir

_THEME_FIELDS = {f.name for f in fields(Theme)}


def shipped_dirs() -> list[Path]:
    """Where the bundled themes are: the source tree's themes/, or the copy installed as package data."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "themes", here.parents[1] / "_themes"]
    return [p for p in candidates if p.is_dir()]


def user_dir() -> Path:
    return config_dir() / "themes"


@dataclass
class ThemeLoad:
    themes: list[Theme]
    problems: list[str]  # one line per file that could not be used


def read_theme(path: Path) -> Theme:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = set(data) - _THEME_FIELDS
    if unknown:
        raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
    if "name" not in data or "primary" not in data:
        raise ValueError("a theme needs at least 'name' and 'primary'")
    return Theme(**data)


def load_themes() -> ThemeLoad:
    """Bundled themes first, then the user's (a user theme with the same name wins)."""
    themes: dict[str, Theme] = {}
    problems: list[str] = []
    dirs = shipped_dirs() + ([user_dir()] if user_dir().is_dir() else [])
    for d in dirs:
        for path in sorted(d.glob("*.toml")):
            try:
                theme = read_theme(path)
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError, TypeError) as exc:
                problems.append(f"theme file {path}: {exc}")
                continue
            themes[theme.name] = theme
    return ThemeLoad(list(themes.values()), problems)


def theme_names() -> list[str]:
    """Every theme fmchat can show: its own, the user's, and Textual's built-in ones."""
    from textual.theme import BUILTIN_THEMES

    return [t.name for t in load_themes().themes] + [n for n in BUILTIN_THEMES if n != "textual-ansi"]

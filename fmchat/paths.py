"""Where fmchat keeps its files (platformdirs; XDG variables are honoured on Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "fmchat"


def cache_dir() -> Path:
    """Converted models and other rebuildable files ($FMCHAT_CACHE_DIR overrides)."""
    return Path(os.environ.get("FMCHAT_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    """Saved sessions."""
    return Path(platformdirs.user_data_dir(APP))


def compiled_dir() -> Path:
    """Compiled decode steps, one entry per model, load options and machine (rebuildable)."""
    return cache_dir() / "compiled"


def quantized_dir() -> Path:
    """Quantized weights kept from the first load of each model and scheme (rebuildable)."""
    return cache_dir() / "quantized"

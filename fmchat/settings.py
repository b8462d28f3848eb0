"""User settings: a dataclass saved as TOML in the platformdirs config dir. CLI flags override the file."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tomli_w

from fmchat.paths import config_dir

DEFAULT_THEME = "fmchat-dark"


@dataclass
class Settings:
    model: str | None = None  # None = the default model
    backend: str = "transformers"
    base_url: str | None = None  # openai backend: the server, e.g. http://127.0.0.1:8080/v1
    api_model: str | None = None  # openai backend: the model name on the server (None = the first it lists)
    quant: str = "none"
    kernel: str = "sdpa"
    kv_cache: bool = True
    ctx: int | None = None  # context window cap (tokens); None = the model's
    memory_policy: str = "shift"  # the engine's default (fmchat.memory); "none" stops with a message when full
    device: str = "auto"
    dtype: str = "auto"
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int | None = None
    system: str | None = None
    theme: str = DEFAULT_THEME
    show_panel: bool = True

    # ------------------------------------------------------------ derived
    @property
    def load_dtype(self) -> str:
        """The dtype the backend loads with: a bf16/fp16 quantization is a dtype on this backend."""
        from fmchat.options import QUANT_DTYPES, engine_has_quant

        return self.dtype if engine_has_quant() else QUANT_DTYPES.get(self.quant, self.dtype)

    def load_key(self) -> tuple:
        """Settings that need the model reloaded when they change."""
        return (self.model, self.backend, self.base_url, self.api_model, self.quant, self.kernel, self.ctx, self.device,
                self.load_dtype)  # fmt: skip

    def override(self, **values) -> Settings:
        """A copy with every non-None value replaced (how CLI flags apply on top of the file)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> list[str]:
        """Problems with these settings, one line each (empty = fine)."""
        from fmchat import options

        problems = [p for kind in options.REGISTRY if (p := options.check(kind, getattr(self, kind)))]
        if self.backend == "openai" and not self.base_url:
            problems.append("the openai backend needs a server URL (e.g. http://127.0.0.1:8080/v1)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            problems.append(f"server URL '{self.base_url}' must start with http:// or https://")
        if self.ctx is not None and self.ctx < 16:
            problems.append(f"context size must be at least 16 tokens (got {self.ctx})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 <= self.top_p <= 1:
            problems.append(f"top-p must be between 0 and 1 (got {self.top_p})")
        if self.max_new_tokens < 1:
            problems.append(f"max new tokens must be at least 1 (got {self.max_new_tokens})")
        return problems

    # ------------------------------------------------------------ TOML
    def to_toml(self) -> dict:
        # TOML has no null: unset optional values are simply left out.
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_toml(cls, data: dict) -> Settings:
        kinds = {f.name: f for f in fields(cls)}
        s = cls()
        for key, value in data.items():
            if key not in kinds:
                continue  # a key from a newer or older version: ignore
            default = getattr(s, key)
            if isinstance(default, bool) and not isinstance(value, bool):
                continue
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            setattr(s, key, value)
        return s


def settings_path() -> Path:
    return config_dir() / "settings.toml"


class SettingsError(ValueError):
    pass


def load(path: Path | None = None) -> Settings:
    """Settings from the TOML file; defaults when there is none. A broken file raises SettingsError."""
    path = path or settings_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
    return Settings.from_toml(data)


def save(settings: Settings, path: Path | None = None) -> Path:
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(settings.to_toml()), encoding="utf-8")
    tmp.replace(path)
    return path

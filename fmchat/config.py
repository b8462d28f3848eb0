"""One config for everything a run can set: ``RunConfig``.

Each field says once how the user sets it (its CLI flag and help), which registry its choices come from,
whether the settings file keeps it (``saved``), whether changing it needs the model reloaded (``reload``)
and which entry points offer it (``scope``: "chat" = ``run``, ``chat --plain``, ``chat`` and ``fmchat``;
"app" = only the full-screen app). The CLI options, their help text, validation and the settings pane are
generated from these fields and from the registries (``fmchat.registry``), where every backend, kernel,
quantization, context policy and decode path registered itself next to its implementation.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace

# Importing these registers their choices (each package declares its own, and none of them imports torch).
import fmchat.backends
import fmchat.backends.transformers
import fmchat.context  # noqa: F401  context policies
from fmchat import registry, templates
from fmchat.errors import UserError

DEFAULT_THEME = "fmchat-dark"


def _f(default, *flags: str, help: str, choices: registry.Registry | None = None, saved: bool = True, reload: bool = False,
       scope: str = "chat", min: float | None = None, max: float | None = None, label: str = ""):  # fmt: skip
    meta = {"flags": flags, "help": help, "choices": choices, "saved": saved, "reload": reload, "scope": scope,
            "min": min, "max": max, "label": label}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # what runs (changing any of these reloads the model)
    model: str | None = _f(None, "--model", "-m", help="Alias, local HF dir, .gguf file or hub id (default: smollm2-135m).", reload=True, label="Model")  # fmt: skip
    backend: str = _f("transformers", "--backend", "-b", help="Backend.", choices=registry.BACKENDS, reload=True, label="Backend")  # fmt: skip
    base_url: str | None = _f(None, "--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8080/v1", reload=True, label="Server URL")  # fmt: skip
    api_model: str | None = _f(None, "--api-model", help="openai backend: model name on the server (default: the first it lists).", reload=True, label="Server model")  # fmt: skip
    quant: str = _f("none", "--quant", help="Weight quantization (kernels/quant).", choices=registry.QUANTS, reload=True, label="Quantization")  # fmt: skip
    kernel: str = _f("sdpa", "--kernel", help="Attention kernel (kernels/attention).", choices=registry.KERNELS, reload=True, label="Attention kernel")  # fmt: skip
    compile: str = _f("auto", "--compile", help="Decode path: auto (the compiled one-token step where it works here, compiled once per machine in the background and cached; eager meanwhile), eager, or compiled (at load). off/on: old names of eager/compiled.", choices=registry.DECODE_PATHS, reload=True, label="Decode path")  # fmt: skip
    device: str = _f("auto", "--device", help="Device.", choices=registry.DEVICES, reload=True, label="Device")  # fmt: skip
    dtype: str = _f("auto", "--dtype", help="Dtype of the weights and the KV cache.", choices=registry.DTYPES, reload=True, label="Dtype")  # fmt: skip
    ctx: int | None = _f(None, "--ctx", help="Context window cap (tokens; default: the model's, at most 8192).", reload=True, min=16, label="Context size")  # fmt: skip
    threads: int | None = _f(None, "--threads", help="CPU threads (default: one per physical core).", reload=True, min=1, saved=False, label="Threads")  # fmt: skip
    gpu_layers: int = _f(0, "--gpu-layers", help="llama.cpp: layers offloaded to the GPU (-1 = all).", reload=True, min=-1, label="GPU layers")  # fmt: skip
    chat_template: str | None = _f(None, "--chat-template", help="Chat template: a built-in (chatml, llama3, phi3, gemma, mistral) or a .jinja file (default: the model's own, else a built-in picked from its tokens).", reload=True, saved=False, label="Chat template")  # fmt: skip
    # how the chat runs (applied from the next turn, no reload)
    kv_cache: bool = _f(True, "--kv-cache/--no-kv-cache", help="Reuse the KV cache across turns.", label="KV cache")  # fmt: skip
    memory: str = _f("shift", "--memory", help="When the context window is full.", choices=registry.POLICIES, label="Memory policy")  # fmt: skip
    system: str | None = _f(None, "--system", help="System prompt.", label="System prompt")
    max_new_tokens: int = _f(512, "--max-new-tokens", help="Most tokens per reply.", min=1, label="Max new tokens")
    temperature: float = _f(0.7, "--temperature", help="Sampling temperature; 0 = greedy.", min=0.0, label="Temperature")
    top_p: float = _f(0.95, "--top-p", help="Nucleus sampling.", min=0.0, max=1.0, label="Top-p")
    seed: int | None = _f(None, "--seed", help="Sampling seed (reproducible replies).", label="Seed")
    kv_snapshot_cap: int = _f(4096, "--kv-snapshot-cap", help="Saved sessions: most MiB of KV snapshots kept on disk; past it the least recently used are dropped (those chats re-prefill on resume).", min=1, label="KV snapshot cap (MiB)")  # fmt: skip
    # the full-screen app
    theme: str = _f(DEFAULT_THEME, "--theme", help="fmchat-dark | fmchat-light | fmchat-high-contrast | a user theme.", scope="app", label="Theme")  # fmt: skip
    show_panel: bool = _f(True, help="Show the inference panel.", scope="app")

    # ------------------------------------------------------------ derived
    def load_key(self) -> tuple:
        """The settings that need the model reloaded when they change."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.metadata["reload"])

    def override(self, **values) -> RunConfig:
        """A copy with every non-None value replaced (how CLI flags apply on top of defaults or the file)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> list[str]:
        """Problems with this config, one line each (empty = fine)."""
        problems = []
        for f in fields(self):
            m, value = f.metadata, getattr(self, f.name)
            if m["choices"] is not None and (p := m["choices"].check(value)):
                problems.append(p)
            what = (m["label"] or f.name).lower()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if m["min"] is not None and value < m["min"]:
                    problems.append(f"{what} must be at least {m['min']} (got {value})")
                if m["max"] is not None and value > m["max"]:
                    problems.append(f"{what} must be at most {m['max']} (got {value})")
        if self.backend == "openai" and not self.base_url:
            problems.append("the openai backend needs a server URL: it needs --base-url (in the app: Server URL, F2), "
                            "e.g. http://127.0.0.1:8080/v1")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            problems.append(f"server URL '{self.base_url}' must start with http:// or https://")
        if p := templates.problem(self.chat_template):
            problems.append(p)
        return problems

    def check(self) -> RunConfig:
        """Self, or UserError with the first problem."""
        if problems := self.validate():
            raise UserError(problems[0])
        return self

    # ------------------------------------------------------------ the settings file
    def to_saved(self) -> dict:
        """The saved subset, as TOML values (TOML has no null: unset optional values are left out)."""
        return {f.name: v for f in fields(self) if f.metadata["saved"] and (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_saved(cls, data: dict) -> RunConfig:
        """From a settings file: unknown keys (a newer or older version) and values of the wrong type are ignored."""
        data = dict(data)
        if "memory_policy" in data and "memory" not in data:  # the key's name before fmchat 0.2
            data["memory"] = data.pop("memory_policy")
        kinds = {f.name: f for f in fields(cls) if f.metadata["saved"]}
        c = cls()
        for key, value in data.items():
            if key not in kinds:
                continue
            default = getattr(c, key)
            if isinstance(default, bool) != isinstance(value, bool):
                continue
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            setattr(c, key, value)
        return c

    def to_dict(self) -> dict:
        return asdict(self)


def option_fields(scope: str = "chat") -> list:
    """The RunConfig fields an entry point offers as CLI options: "chat" for run / chat / chat --plain,
    "app" adds the app-only ones."""
    scopes = {"chat": ("chat",), "app": ("chat", "app")}[scope]
    return [f for f in fields(RunConfig) if f.metadata["flags"] and f.metadata["scope"] in scopes]


def field_info(name: str):
    return next(f for f in fields(RunConfig) if f.name == name)


def default_of(name: str):
    f = field_info(name)
    return None if f.default is MISSING else f.default


def choices(name: str) -> list[registry.Choice]:
    """The choices of a registry-backed field, each with its availability here."""
    reg = field_info(name).metadata["choices"]
    if reg is None:
        raise KeyError(f"{name} has no registry")
    return reg.choices()


CHOICE_FIELDS = tuple(f.name for f in fields(RunConfig) if f.metadata["choices"] is not None)

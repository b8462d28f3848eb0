"""The settings pane: a modal form over the registry of choices. Dismisses with new Settings, or None."""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static, Switch

from fmchat import models, options
from fmchat.settings import Settings

CHOICE_ROWS = [
    ("backend", "Backend"),
    ("quant", "Quantization"),
    ("kernel", "Attention kernel"),
    ("device", "Device"),
    ("dtype", "Dtype"),
    ("memory_policy", "Memory policy"),
]


class ChoiceSet(RadioSet):
    """A RadioSet over a registry kind: unavailable choices are disabled and say why."""

    def __init__(self, kind: str, current: str, **kwargs) -> None:
        self.kind = kind
        self.choices = options.choices(kind)
        buttons = [
            RadioButton(
                Text(c.value + ("" if c.available else f" — {c.reason}")),
                value=c.value == current,
                disabled=not c.available,
                tooltip=c.label if c.available else f"{c.label}: {c.reason}",
            )
            for c in self.choices
        ]
        super().__init__(*buttons, id=f"set-{kind}", **kwargs)

    @property
    def selected(self) -> str | None:
        i = self.pressed_index
        return self.choices[i].value if i >= 0 else None


def _row(label: str, widget, hint: str = "") -> Horizontal:
    parts = [Label(label, classes="setting-label"), widget]
    if hint:
        parts.append(Static(Text(hint, style="dim"), classes="setting-hint"))
    return Horizontal(*parts, classes="setting-row")


class SettingsScreen(ModalScreen[Settings | None]):
    BINDINGS = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("ctrl+s", "apply", "Apply"),
    ]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-dialog") as dialog:
            dialog.border_title = "Settings"
            dialog.border_subtitle = "Ctrl+S apply · Esc close"
            with VerticalScroll(id="settings-form"):
                yield _row(
                    "Model",
                    Input(s.model or "", placeholder=models.DEFAULT_MODEL, id="set-model"),
                    "alias (" + ", ".join(models.ALIASES) + "), HF dir, .gguf or hub id",
                )
                for kind, label in CHOICE_ROWS:
                    yield _row(label, ChoiceSet(kind, getattr(s, kind)))
                yield _row(
                    "Server URL",
                    Input(s.base_url or "", placeholder="http://127.0.0.1:8080/v1", id="set-base_url"),
                    "openai backend",
                )
                yield _row(
                    "Server model", Input(s.api_model or "", placeholder="first listed", id="set-api_model"), "openai backend"
                )
                yield _row("KV cache", Switch(s.kv_cache, id="set-kv_cache"), "reuse the cache across turns")
                yield _row(
                    "Context size",
                    Input("" if s.ctx is None else str(s.ctx), placeholder="model's own", type="integer", id="set-ctx"),
                    "tokens; empty = the model's (capped at 8192)",
                )
                yield _row("Temperature", Input(str(s.temperature), type="number", id="set-temperature"), "0 = greedy")
                yield _row("Top-p", Input(str(s.top_p), type="number", id="set-top_p"), "0..1")
                yield _row(
                    "Max new tokens", Input(str(s.max_new_tokens), type="integer", id="set-max_new_tokens"), "tokens per reply"
                )
                yield _row(
                    "Seed",
                    Input("" if s.seed is None else str(s.seed), placeholder="random", type="integer", id="set-seed"),
                    "same seed, same replies",
                )
                yield _row("System prompt", Input(s.system or "", placeholder="(none)", id="set-system"))
            yield Static("", id="settings-error", markup=False)
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#set-model", Input).focus()

    def read_form(self) -> tuple[Settings | None, list[str]]:
        errors: list[str] = []

        def number(field: str, cast, optional: bool = False):
            raw = self.query_one(f"#set-{field}", Input).value.strip()
            if not raw:
                if optional:
                    return None
                errors.append(f"{field.replace('_', ' ')}: a value is needed")
                return getattr(self.settings, field)
            try:
                return cast(raw)
            except ValueError:
                errors.append(f"{field.replace('_', ' ')}: '{raw}' is not a number")
                return getattr(self.settings, field)

        values: dict = {}
        model = self.query_one("#set-model", Input).value.strip()
        values["model"] = model or None
        for kind, _ in CHOICE_ROWS:
            values[kind] = self.query_one(f"#set-{kind}", ChoiceSet).selected or getattr(self.settings, kind)
        values["base_url"] = self.query_one("#set-base_url", Input).value.strip() or None
        values["api_model"] = self.query_one("#set-api_model", Input).value.strip() or None
        values["kv_cache"] = self.query_one("#set-kv_cache", Switch).value
        values["ctx"] = number("ctx", int, optional=True)
        values["temperature"] = number("temperature", float)
        values["top_p"] = number("top_p", float)
        values["max_new_tokens"] = number("max_new_tokens", int)
        values["seed"] = number("seed", int, optional=True)
        values["system"] = self.query_one("#set-system", Input).value or None
        new = replace(self.settings, **values)
        errors += new.validate()
        return (None if errors else new), errors

    def action_apply(self) -> None:
        new, errors = self.read_form()
        if new is None:
            self.query_one("#settings-error", Static).update(Text("\n".join(errors), style="bold red"))
            return
        self.dismiss(new)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.dismiss(None)

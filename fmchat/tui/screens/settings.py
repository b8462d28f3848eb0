"""The settings pane, generated from ``RunConfig``'s fields and the registries.

One row per field of scope "chat" or "app" that has a ``label``: a radio set over the field's registry
(choices that cannot be used here are disabled and say why), a switch for a bool, an input for a str, int or
float (the field's ``help`` as hint, its bounds checked by ``RunConfig.validate``). A new field in
``RunConfig`` shows up here by itself. Every widget's id is ``set-<field>``. Dismisses with the new
RunConfig, or None.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, fields, replace
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static, Switch

from fmchat.config import RunConfig, choices

SCOPES = ("chat", "app")
_TYPES = {"str | None": (str, True), "str": (str, False), "int | None": (int, True), "int": (int, False),
          "float | None": (float, True), "float": (float, False), "bool": (bool, False)}  # fmt: skip


def form_fields() -> list:
    """The RunConfig fields the pane offers, in their declared order."""
    return [f for f in fields(RunConfig) if f.metadata["label"] and f.metadata["scope"] in SCOPES]


def kind_of(f) -> tuple[type, bool]:
    """(value type, whether None is allowed) of a field."""
    return _TYPES[str(f.type)]


def placeholder(f) -> str:
    """What an empty input means, from the field's help: "default: X)" or "e.g. X"; else "none"."""
    help_text = f.metadata["help"]
    if m := re.search(r"default: ([^)]*)\)", help_text):
        return m.group(1)
    if m := re.search(r"e\.g\. (\S+)", help_text):
        return m.group(1)
    default = None if f.default is MISSING else f.default
    return "none" if default is None else str(default)


class ChoiceSet(RadioSet):
    """A RadioSet over a field's registry: unavailable choices are disabled and say why."""

    def __init__(self, name: str, current: str, **kwargs) -> None:
        self.kind = name
        self.choices = choices(name)
        buttons = [
            RadioButton(
                Text(c.value + ("" if c.available else f" — {c.reason}")),
                value=c.value == current,
                disabled=not c.available,
                tooltip=c.label if c.available else f"{c.label}: {c.reason}",
            )
            for c in self.choices
        ]
        super().__init__(*buttons, id=f"set-{name}", **kwargs)

    def on_mount(self) -> None:
        # RadioSet's own mount (which runs after this handler) highlights the first enabled choice; once it has
        # run, move the highlight to the selected one.
        self.call_later(self._highlight_selected)

    def _highlight_selected(self) -> None:
        i = self.pressed_index
        if i >= 0 and not self._nodes[i].disabled:
            self._selected = i

    @property
    def selected(self) -> str | None:
        i = self.pressed_index
        return self.choices[i].value if i >= 0 else None


def field_widget(f, value):
    """The widget that edits field ``f`` (id ``set-<name>``), showing ``value``."""
    wid = f"set-{f.name}"
    if f.metadata["choices"] is not None:
        return ChoiceSet(f.name, value)
    typ, _ = kind_of(f)
    if typ is bool:
        return Switch(bool(value), id=wid)
    input_type = {int: "integer", float: "number"}.get(typ, "text")
    return Input("" if value is None else str(value), placeholder=placeholder(f), type=input_type, id=wid)


def _row(f, widget) -> Horizontal:
    m = f.metadata
    label = Label(m["label"], classes="setting-label")
    label.tooltip = m["help"]
    parts = [label, widget]
    if m["choices"] is None:
        parts.append(Static(Text(m["help"], style="dim"), classes="setting-hint"))
    return Horizontal(*parts, classes="setting-row", id=f"row-{f.name}")


class SettingsScreen(ModalScreen[RunConfig | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss_none", "Close"),
        Binding("ctrl+s", "apply", "Apply"),
    ]

    def __init__(self, settings: RunConfig, check: Callable[[RunConfig], list[str]] | None = None) -> None:
        """``check``: problems the app adds to ``RunConfig.validate()`` (e.g. a theme it does not know)."""
        super().__init__()
        self.settings = settings
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical(id="settings-dialog") as dialog:
            dialog.border_title = "Settings"
            dialog.border_subtitle = "Ctrl+S apply · Esc close"
            with VerticalScroll(id="settings-form"):
                for f in form_fields():
                    yield _row(f, field_widget(f, getattr(self.settings, f.name)))
            yield Static("", id="settings-error", markup=False)
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(f"#set-{form_fields()[0].name}").focus()

    def read_value(self, f, errors: list[str]):
        """The value the form holds for ``f`` (the current one, with a line in ``errors``, when it is unusable)."""
        widget = self.query_one(f"#set-{f.name}")
        current = getattr(self.settings, f.name)
        if isinstance(widget, ChoiceSet):
            return widget.selected or current
        if isinstance(widget, Switch):
            return widget.value
        typ, optional = kind_of(f)
        what = f.metadata["label"].lower()
        raw = widget.value.strip()
        if not raw:
            if optional:
                return None
            errors.append(f"{what}: a value is needed")
            return current
        if typ is str:
            return raw
        try:
            return typ(raw)
        except ValueError:
            errors.append(f"{what}: '{raw}' is not {'a whole number' if typ is int else 'a number'}")
            return current

    def read_form(self) -> tuple[RunConfig | None, list[str]]:
        errors: list[str] = []
        values = {f.name: self.read_value(f, errors) for f in form_fields()}
        new = replace(self.settings, **values)
        errors += new.validate()
        if self.check is not None:
            errors += self.check(new)
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

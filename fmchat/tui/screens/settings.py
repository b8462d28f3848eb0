"""The settings pane, generated from ``RunConfig``'s fields and the registries.

One row per field of scope "chat" or "app" that has a ``label``: a radio set over the field's registry, a
switch for a bool, an input for a str, int or float (the field's ``help`` as hint, its bounds checked by
``RunConfig.validate``). A new field in ``RunConfig`` shows up here by itself. Every widget's id is
``set-<field>``. Dismisses with the new RunConfig, or None.

A choice that cannot be used now is disabled and says why: because of this machine (the registry's
availability check: "needs llama-cpp-python", "no CUDA device") or because of the rest of the form (what
``RunConfig.validate`` would refuse with that choice and not without it: ``openai`` with no server URL; a setting
the form's backend does not have: llama.cpp has no decode path choice). The second kind follows the form as it
is edited. ``choice_reason`` is that rule; the command palette's decode path entries ask it too.

Compact, so that the pane is usable in an 80x24 terminal: one line per input or switch, a radio set's choices
flowed into as many columns as fit; below 100 columns the hints leave the rows, and the focused field's help
shows under the form (as it does at every width).
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
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static, Switch

from fmchat import registry
from fmchat.config import RunConfig, choices, default_of, field_info
from fmchat.errors import UnknownChoice
from fmchat.text import neutralize

SCOPES = ("chat", "app")
_TYPES = {"str | None": (str, True), "str": (str, False), "int | None": (int, True), "int": (int, False),
          "float | None": (float, True), "float": (float, False), "bool": (bool, False)}  # fmt: skip


def form_fields() -> list:
    """The RunConfig fields the pane offers, in their declared order."""
    return [f for f in fields(RunConfig) if f.metadata["label"] and f.metadata["scope"] in SCOPES]


def flag_name(f) -> str:
    """How a field is named in one line: its CLI flag without dashes (``kv-cache``), else its name."""
    flags = f.metadata["flags"]
    return flags[0].split("/")[0].lstrip("-") if flags else f.name


def shown_value(value, width: int = 24) -> str:
    """A setting's value on one line: on/off, "default" for unset, long text cut with "…"."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    text = " ".join(neutralize(str(value)).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return f'"{text}"' if " " in text or not text else text


def describe_changes(old: RunConfig, new: RunConfig) -> str:
    """What differs between two configs, as the transcript's one line says it ('' when nothing does):
    "quant none → int8, kernel sdpa → fmc"."""
    return ", ".join(
        f"{flag_name(f)} {shown_value(getattr(old, f.name))} → {shown_value(getattr(new, f.name))}"
        for f in form_fields()
        if getattr(old, f.name) != getattr(new, f.name)
    )


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


def form_reason(config: RunConfig, name: str, value: str) -> str:
    """Why ``value`` for field ``name`` cannot go with the rest of ``config`` ('' when it can): the first
    problem ``RunConfig.validate`` has with it that it has not with the field's default, shortened to what
    follows the choice's name ("the openai backend needs a server URL: ..." -> "needs a server URL")."""
    if value == default_of(name):
        return ""
    before = set(replace(config, **{name: default_of(name)}).validate())
    new = [p for p in replace(config, **{name: value}).validate() if p not in before]
    if not new:
        return ""
    first = new[0].split(":")[0]
    return re.sub(rf"^the {re.escape(value)} [\w ]*?(?=needs |must |cannot )", "", first)


# A setting only some backends have: the backend capability (``registry.BACKENDS``) it needs. llama.cpp and an
# OpenAI-compatible server decode their own way: they have no decode path choice.
BACKEND_CAPABILITY = {"compile": "compiled-step"}


def backend_reason(config: RunConfig, name: str) -> str:
    """Why field ``name`` means nothing on ``config``'s backend ('' when it does): "llamacpp has no decode path
    choice"."""
    cap = BACKEND_CAPABILITY.get(name)
    if cap is None:
        return ""
    try:
        entry = registry.BACKENDS.entry(config.backend)
    except UnknownChoice:  # an unknown backend: RunConfig.validate says so
        return ""
    if cap in entry.capabilities:
        return ""
    return f"{config.backend} has no {field_info(name).metadata['choices'].title} choice"


def choice_reason(config: RunConfig, name: str, choice) -> str:
    """Why ``choice`` (a ``registry.Choice``) of field ``name`` cannot be used with ``config`` now ('' when it can):
    this machine (the registry's check), the backend (one without the setting) or the rest of the config
    (``form_reason``). The settings pane and the command palette both ask this."""
    return choice.reason or backend_reason(config, name) or form_reason(config, name, choice.value)


def offered(name: str) -> tuple[list, dict[str, str]]:
    """A registry field's choices as offered, and each old name -> the choice it names. Old names kept so that old
    settings files load (capability "alias", "alias-of:<name>") are not offered twice."""
    every = choices(name)
    alias_of = {c.value: cap.split(":", 1)[1] for c in every for cap in c.capabilities if cap.startswith("alias-of:")}
    return [c for c in every if "alias" not in c.capabilities], alias_of


BUTTON_CHROME = 5  # a radio button's width besides its label: "▐●▌" and a space either side of the label
COLUMN_GAP = 2


def flow(widths: list[int], room: int) -> list[list[int]]:
    """Items of ``widths`` laid out left to right, a new line when the next does not fit in ``room``: the
    indexes on each line."""
    lines: list[list[int]] = []
    used = room + 1
    for i, w in enumerate(widths):
        if lines and used + COLUMN_GAP + w <= room:
            lines[-1].append(i)
            used += COLUMN_GAP + w
        else:
            lines.append([i])
            used = w
    return lines


class ChoiceSet(RadioSet):
    """A RadioSet over a field's registry, its choices flowed into columns; choices that cannot be used now
    are disabled and say why."""

    def __init__(self, name: str, current: str, **kwargs) -> None:
        self.kind = name
        self.current = current
        # An old name (``offered``) as the current value shows as the choice it names, and stays as it is unless
        # changed.
        self.choices, self.alias_of = offered(name)
        current = self.alias_of.get(current, current)
        self.reasons = [c.reason for c in self.choices]  # why each choice cannot be used now ('' when it can)
        buttons = [
            RadioButton(
                self._choice_label(c, c.reason),
                value=c.value == current,
                disabled=not c.available,
                tooltip=self._choice_tip(c, c.reason),
            )
            for c in self.choices
        ]
        super().__init__(*buttons, id=f"set-{name}", compact=True, **kwargs)

    @staticmethod
    def _choice_label(c, reason: str) -> Text:
        return Text(c.value + (f" — {reason}" if reason else ""))

    @staticmethod
    def _choice_tip(c, reason: str) -> str:
        return f"{c.label}: {reason}" if reason else c.label

    @property
    def buttons(self) -> list[RadioButton]:
        return list(self.query_children(RadioButton))

    def follow_form(self, config: RunConfig) -> None:
        """Disable (with the reason) the choices the rest of the form rules out (its backend included); enable the
        others that this machine allows."""
        changed = False
        for i, (c, button) in enumerate(zip(self.choices, self.buttons)):
            reason = choice_reason(config, self.kind, c)
            if reason != self.reasons[i]:
                self.reasons[i] = reason
                button.label = self._choice_label(c, reason)
                button.tooltip = self._choice_tip(c, reason)
                button.disabled = bool(reason)
                changed = True
        if changed:
            self.flow(self.size.width)

    def flow(self, room: int) -> None:
        """Lay the choices out like words in a paragraph: a grid one cell per column, each button spanning its
        width (and the gap after it), the last on a line spanning the rest."""
        if room <= 0:
            return
        widths = [BUTTON_CHROME + len(self._choice_label(c, r)) for c, r in zip(self.choices, self.reasons)]
        self.styles.grid_size_columns = room
        self.styles.grid_columns = "1"
        buttons = self.buttons
        for line in flow(widths, room):
            left = room
            for i in line:
                span = min(left, widths[i] + COLUMN_GAP) if i != line[-1] else left
                buttons[i].styles.column_span = span
                left -= span

    def on_resize(self, event) -> None:
        self.flow(event.size.width)

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
        if i < 0:
            return None
        value = self.choices[i].value
        return self.current if self.alias_of.get(self.current) == value else value  # "off" unchanged stays "off"


def field_widget(f, value):
    """The widget that edits field ``f`` (id ``set-<name>``), showing ``value``."""
    wid = f"set-{f.name}"
    if f.metadata["choices"] is not None:
        return ChoiceSet(f.name, value)
    typ, _ = kind_of(f)
    if typ is bool:
        return Switch(bool(value), id=wid)
    input_type = {int: "integer", float: "number"}.get(typ, "text")
    return Input("" if value is None else str(value), placeholder=placeholder(f), type=input_type, id=wid,
                 compact=True)  # fmt: skip


def switch_state(on: bool) -> str:
    return "on" if on else "off"


def _row(f, widget) -> Horizontal:
    m = f.metadata
    label = Label(m["label"], classes="setting-label")
    label.tooltip = m["help"]
    widget.tooltip = widget.tooltip or m["help"]
    parts = [label, widget]
    if isinstance(widget, Switch):  # the switch's slider is drawn in colours only: say it in words too
        parts.append(Static(switch_state(widget.value), classes="setting-state", id=f"state-{f.name}"))
    if m["choices"] is None:
        parts.append(Static(Text(m["help"], style="dim"), classes="setting-hint"))
    return Horizontal(*parts, classes="setting-row", id=f"row-{f.name}")


class SettingsScreen(ModalScreen[RunConfig | None]):
    # Below 100 columns the hints leave the rows; below 30 lines the dialog takes the whole screen.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (30, "-tall")]
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
            yield Static("", id="settings-help", markup=False)
            yield Static("", id="settings-error", markup=False, classes="-empty")
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one(f"#set-{form_fields()[0].name}").focus()
        self.follow_form()

    def follow_form(self) -> None:
        """Each choice set's availability against the form as it stands now."""
        try:
            config = self.form_config()
        except NoMatches:  # an event from a field while the form is still being built
            return
        for box in self.query(ChoiceSet):
            box.follow_form(config)

    def form_config(self) -> RunConfig:
        """The form's values as a RunConfig, unchecked (unusable entries keep the current value)."""
        return replace(self.settings, **{f.name: self.read_value(f, []) for f in form_fields()})

    def on_input_changed(self, event: Input.Changed) -> None:
        self.follow_form()

    def on_switch_changed(self, event: Switch.Changed) -> None:
        name = (event.switch.id or "").removeprefix("set-")
        for state in self.query(f"#state-{name}"):
            state.update(switch_state(event.value))
        self.follow_form()

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        self.follow_form()

    def on_descendant_focus(self, event) -> None:
        """The focused field's help under the form (the rows' hints are hidden in a narrow terminal)."""
        row = next((n for n in event.widget.ancestors_with_self if n.has_class("setting-row")), None)
        if row is not None and row.id:
            f = next(f for f in form_fields() if f.name == row.id.removeprefix("row-"))
            text = f"{f.metadata['label']}: {f.metadata['help']}"
            self.query_one("#settings-help", Static).update(Text(neutralize(text), style="dim"))

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
            error = self.query_one("#settings-error", Static)
            error.update(Text("\n".join(errors), style="bold red"))
            error.remove_class("-empty")
            return
        self.dismiss(new)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.dismiss(None)

"""Self-registering choices: every backend, attention kernel, quantization, context policy, decode path,
device and dtype says once — where it is implemented — its name, label, whether it can be used on this
machine now (and if not, why) and what it can do. The CLI's options and help, validation and the
settings pane are all generated from these registries (``fmchat.config``).

This module is a leaf: it imports nothing from fmchat. Availability checks are callables, run when asked
(so ``fmchat --help`` does not import torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fmchat.errors import UnknownChoice


@dataclass(frozen=True)
class Choice:
    """One choice as offered right now. ``reason`` says why it cannot be used here ('' when it can)."""

    value: str
    label: str
    reason: str = ""
    capabilities: frozenset[str] = frozenset()

    @property
    def available(self) -> bool:
        return not self.reason

    def describe(self) -> str:
        return self.label if self.available else f"{self.label} ({self.reason})"


@dataclass(frozen=True)
class Entry:
    value: str
    label: str
    unavailable: Callable[[], str] | None = None  # returns why it cannot be used here, '' when it can
    capabilities: frozenset[str] = frozenset()
    target: str = ""  # "module:attribute" of the implementation (backends), imported only when used


@dataclass
class Registry:
    kind: str  # the RunConfig field it fills, e.g. "kernel"
    title: str  # as the user reads it, e.g. "attention kernel"
    _entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, value: str, label: str, *, unavailable: Callable[[], str] | None = None, capabilities=(), target: str = "") -> None:
        if value in self._entries:
            raise ValueError(f"{self.title} '{value}' is registered twice")
        self._entries[value] = Entry(value, label, unavailable, frozenset(capabilities), target)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entry(self, value: str) -> Entry:
        self.require(value, check_available=False)
        return self._entries[value]

    def choices(self) -> list[Choice]:
        out = []
        for e in self._entries.values():
            reason = e.unavailable() if e.unavailable is not None else ""
            out.append(Choice(e.value, e.label, reason, e.capabilities))
        return out

    def check(self, value: str) -> str | None:
        """None when ``value`` can be used here, else one line saying why not."""
        e = self._entries.get(value)
        if e is None:
            return f"unknown {self.title} '{value}' (choices: {', '.join(self._entries)})"
        reason = e.unavailable() if e.unavailable is not None else ""
        return f"{self.title} '{value}' is not available: {reason}" if reason else None

    def require(self, value: str, check_available: bool = True) -> None:
        """Raise UnknownChoice when ``value`` is unknown (or, by default, not available here)."""
        if value not in self._entries:
            raise UnknownChoice(f"unknown {self.title} '{value}' (choices: {', '.join(self._entries)})")
        if check_available and (problem := self.check(value)):
            raise UnknownChoice(problem)

    def help(self) -> str:
        return " | ".join(self._entries)


BACKENDS = Registry("backend", "backend")
KERNELS = Registry("kernel", "attention kernel")
QUANTS = Registry("quant", "quantization")
POLICIES = Registry("memory", "memory policy")  # the context-window policy (fmchat.context), not RAM
DECODE_PATHS = Registry("compile", "decode path")
DEVICES = Registry("device", "device")
DTYPES = Registry("dtype", "dtype")

ALL = (BACKENDS, QUANTS, KERNELS, DECODE_PATHS, DEVICES, DTYPES, POLICIES)

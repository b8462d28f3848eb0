"""The key bar, fitted to the terminal's width.

Textual's footer shows every key with room around it; at 120 columns they all fit. Narrower, it drops what
is said elsewhere, in this order, so that the keys that matter (cancel, new chat, retry, settings, panel,
sessions, keys, quit) still fit at 80 columns:

* below ``FULL`` columns the keys are drawn compact (less space between them);
* below ``TYPING_KEYS`` the message box's own keys (Enter sends, Ctrl+J newline) leave the bar: the box's
  placeholder says them (``ChatInput.check_action``);
* below ``PALETTE_KEY`` the command palette's key leaves it: F1 lists it, and the ≡ in the header opens it.
"""

from __future__ import annotations

from textual.widgets import Footer

FULL = 120
TYPING_KEYS = 110
PALETTE_KEY = 92


class AppFooter(Footer):
    def on_mount(self) -> None:
        self.fit(self.app.size.width)

    def on_resize(self, event) -> None:
        self.fit(self.app.size.width)

    def fit(self, width: int) -> None:
        self.compact = width < FULL
        self.show_command_palette = width >= PALETTE_KEY

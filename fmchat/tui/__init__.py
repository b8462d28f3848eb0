"""fmchat's full-screen Textual app. Import ``fmchat.tui.app`` lazily: Textual is not needed by ``fmchat run``."""

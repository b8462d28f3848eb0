"""fmchat: a terminal chat for local language models that shows what inference really costs."""

__version__ = "0.1.0"

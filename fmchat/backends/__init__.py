"""Backends behind one protocol (``base.Backend``). ``load`` picks one by name."""

from __future__ import annotations

from fmchat import models

from .base import Backend, LoadOptions, LoadReport, ProgressFn, no_progress

BACKENDS = {
    "transformers": "PyTorch + Hugging Face transformers (default; full KV-cache and memory introspection)",
}


class UnknownBackend(ValueError):
    pass


def load(
    model: str | None = None,
    backend: str = "transformers",
    options: LoadOptions = LoadOptions(),
    progress: ProgressFn = no_progress,
) -> Backend:
    """Resolve ``model`` and load it on ``backend``. Raises ModelNotFound / UnknownBackend / ValueError."""
    if backend not in BACKENDS:
        raise UnknownBackend(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")
    progress(f"resolving model {model or models.DEFAULT_MODEL}", None)
    source = models.resolve(model)
    from .transformers_backend import TransformersBackend

    return TransformersBackend(source, options, progress)


__all__ = ["BACKENDS", "Backend", "LoadOptions", "LoadReport", "ProgressFn", "UnknownBackend", "load", "no_progress"]

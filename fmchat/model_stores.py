"""GGUF files that other local tools already keep: Ollama, LM Studio, llama.cpp's download cache and GGUF repos
in the Hugging Face cache. Read-only and offline: the stores are listed from disk, never fetched or changed.

Where each store is looked for, and the name ``--model`` takes for what it holds:

* ``ollama``    ``$OLLAMA_MODELS``, else ``~/.ollama/models`` and ``/usr/share/ollama/.ollama/models`` (the Linux
  service's). ``manifests/<host>/<namespace>/<model>/<tag>`` is JSON whose layer of media type
  ``application/vnd.ollama.image.model`` names the GGUF blob ``sha256:<hex>``, kept as ``blobs/sha256-<hex>``.
  Named as Ollama shows it: ``phi3.5``, ``qwen2.5:0.5b``, ``user/model:tag``, ``hf.co/org/repo:Q4_K_M``
  (``registry.ollama.ai``, ``library`` and ``:latest`` implied).
* ``lmstudio``  ``<home>/models/<publisher>/<repo>/*.gguf``, home from ``~/.lmstudio-home-pointer``, else
  ``~/.lmstudio`` and the older ``~/.cache/lm-studio``. Named ``publisher/repo`` (a repo with several GGUFs:
  ``publisher/repo/<file stem>``); the file stem alone works too.
* ``llama.cpp`` ``$LLAMA_CACHE``, else ``$XDG_CACHE_HOME/llama.cpp`` (``~/Library/Caches/llama.cpp`` on macOS): the
  flat ``<org>_<repo>_<file>.gguf`` downloads of ``-hf``, named by their file stem; and the Hugging Face-style
  ``models--org--repo`` folders newer llama.cpp writes there.
* ``hf-cache``  the Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ...):
  ``models--<org>--<repo>/snapshots/<rev>/**.gguf`` of the revision ``refs/main`` names. Named ``org/repo`` when
  the repo holds one GGUF model and no ``config.json``, else ``org/repo/<file stem>``.

Vision projectors (``mmproj*``) and the second and later parts of a split GGUF are not listed.

Also here: ``content_digest`` (the identity of a GGUF's bytes, whichever store path reaches them) and
``gguf_general`` (the ``general.*`` values of a GGUF header; from ``fmchat.gguf_header``, which also has
``gguf_metadata``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fmchat.gguf_header import gguf_general
from fmchat.paths import cache_dir

STORES = ("ollama", "lmstudio", "llama.cpp", "hf-cache")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_OLLAMA_HOST, _OLLAMA_NAMESPACE, _OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
_LATER_SHARD = re.compile(r"-(\d{5})-of-\d{5}$")


@dataclass(frozen=True)
class StoredGGUF:
    store: str  # one of STORES
    name: str  # what --model takes
    path: Path  # the GGUF file (an Ollama blob has no .gguf suffix)
    size: int
    also: tuple[str, ...] = ()  # other names that reach it

    @property
    def label(self) -> str:
        return f"{self.store} {self.name}"


# ---------------------------------------------------------------- where the stores are
def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _dedup(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def ollama_roots() -> list[Path]:
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.path.expanduser(os.environ["OLLAMA_MODELS"]))]
    return _dedup([_home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")])


def lmstudio_roots() -> list[Path]:
    homes = []
    pointer = _home() / ".lmstudio-home-pointer"
    try:
        target = pointer.read_text(encoding="utf-8").strip()
        if target:
            homes.append(Path(os.path.expanduser(target)))
    except OSError:
        pass
    homes += [_home() / ".lmstudio", _home() / ".cache" / "lm-studio"]
    return _dedup([h / "models" for h in homes])


def llamacpp_roots() -> list[Path]:
    if os.environ.get("LLAMA_CACHE"):
        return [Path(os.path.expanduser(os.environ["LLAMA_CACHE"]))]
    if sys.platform == "darwin":
        return [_home() / "Library" / "Caches" / "llama.cpp"]
    if os.name == "nt":
        return [Path(os.environ.get("LOCALAPPDATA") or _home()) / "llama.cpp"]
    return [Path(os.environ.get("XDG_CACHE_HOME") or _home() / ".cache") / "llama.cpp"]


def hf_cache_root() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return Path(os.environ.get("HF_HUB_CACHE") or _home() / ".cache" / "huggingface" / "hub")


def roots() -> dict[str, list[Path]]:
    """Where each store is looked for (whether or not it exists)."""
    return {
        "ollama": ollama_roots(),
        "lmstudio": lmstudio_roots(),
        "llama.cpp": llamacpp_roots(),
        "hf-cache": [hf_cache_root()],
    }


# ---------------------------------------------------------------- what they hold
def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _model_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The GGUF model files of a folder: no vision projectors, and of a split model only its first part."""
    try:
        found = folder.rglob("*.gguf") if recursive else folder.glob("*.gguf")
        files = sorted(p for p in found if p.is_file())
    except OSError:
        return []
    out = []
    for p in files:
        shard = _LATER_SHARD.search(p.stem)
        if "mmproj" in p.name.lower() or (shard and shard.group(1) != "00001"):
            continue
        if is_gguf(p):
            out.append(p)
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []


def ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The shortest name Ollama shows: ``registry.ollama.ai/library/`` and ``:latest`` left out."""
    name = f"{host}/{namespace}/{model}"
    if host.lower() == _OLLAMA_HOST:
        name = model if namespace.lower() == _OLLAMA_NAMESPACE else f"{namespace}/{model}"
    return name if tag.lower() == _OLLAMA_TAG else f"{name}:{tag}"


def _ollama_forms(host: str, namespace: str, model: str, tag: str) -> list[str]:
    """Every way to write one Ollama name, from ``host/namespace/model:tag`` down to the shortest."""
    forms = [f"{host}/{namespace}/{model}"]
    if host.lower() == _OLLAMA_HOST:
        forms.append(f"{namespace}/{model}")
        if namespace.lower() == _OLLAMA_NAMESPACE:
            forms.append(model)
    tagged = [f"{f}:{tag}" for f in forms]
    return tagged + (forms if tag.lower() == _OLLAMA_TAG else [])


def _ollama_model_blob(root: Path, manifest: Path) -> Path | None:
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
    except (OSError, ValueError, AttributeError):
        return None
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") != OLLAMA_MODEL_LAYER:
            continue
        algo, _, digest = str(layer.get("digest", "")).partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            return None
        for blob in (root / "blobs" / f"{algo}-{digest}", root / "blobs" / f"{algo}:{digest}"):  # older Ollama: ':'
            if blob.is_file() and is_gguf(blob):
                return blob
    return None


def ollama_models() -> list[StoredGGUF]:
    out = []
    for root in ollama_roots():
        for host in _subdirs(root / "manifests"):
            for namespace in _subdirs(host):
                for model in _subdirs(namespace):
                    try:
                        tags = sorted(p for p in model.iterdir() if p.is_file())
                    except OSError:
                        continue
                    for tag in tags:
                        blob = _ollama_model_blob(root, tag)
                        if blob is None:
                            continue
                        name = ollama_name(host.name, namespace.name, model.name, tag.name)
                        also = set(_ollama_forms(host.name, namespace.name, model.name, tag.name)) - {name}
                        out.append(StoredGGUF("ollama", name, blob, _size(blob), tuple(sorted(also))))
    return out


def lmstudio_models() -> list[StoredGGUF]:
    out = []
    for root in lmstudio_roots():
        for publisher in _subdirs(root):
            for repo in _subdirs(publisher):
                files = _model_files(repo)
                for f in files:
                    base = f"{publisher.name}/{repo.name}"
                    name = base if len(files) == 1 else f"{base}/{f.stem}"
                    also = {f.stem, f.name, f"{base}/{f.name}", f"{base}/{f.stem}"} - {name}
                    out.append(StoredGGUF("lmstudio", name, f, _size(f), tuple(sorted(also))))
    return out


def _snapshot(repo: Path) -> Path | None:
    """The snapshot of a hub-cache repo that ``refs/main`` names, else the newest one."""
    try:
        rev = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        if rev and (repo / "snapshots" / rev).is_dir():
            return repo / "snapshots" / rev
    except OSError:
        pass
    snaps = _subdirs(repo / "snapshots")
    return max(snaps, key=_mtime) if snaps else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _hub_repos(root: Path, store: str) -> list[StoredGGUF]:
    out = []
    for repo in _subdirs(root):
        if not repo.name.startswith("models--") or "--" not in repo.name[len("models--") :]:
            continue
        snap = _snapshot(repo)
        if snap is None:
            continue
        repo_id = repo.name[len("models--") :].replace("--", "/")
        files = _model_files(snap, recursive=True)
        single = len(files) == 1 and not (snap / "config.json").exists()
        for f in files:
            name = repo_id if single else f"{repo_id}/{f.stem}"
            also = {f.stem, f.name, f"{repo_id}/{f.name}", f"{repo_id}/{f.stem}"} - {name}
            out.append(StoredGGUF(store, name, f, _size(f), tuple(sorted(also))))
    return out


def llamacpp_models() -> list[StoredGGUF]:
    out = []
    hf_root = os.path.abspath(hf_cache_root())
    for root in llamacpp_roots():
        for f in _model_files(root):
            out.append(StoredGGUF("llama.cpp", f.stem, f, _size(f), (f.name,)))
        if os.path.abspath(root) != hf_root:  # newer llama.cpp keeps hub-style repos here when LLAMA_CACHE is set
            out += _hub_repos(root, "llama.cpp")
    return out


def hf_cache_models() -> list[StoredGGUF]:
    return _hub_repos(hf_cache_root(), "hf-cache")


def discover() -> list[StoredGGUF]:
    """Every GGUF model file the stores hold, store by store (in ``STORES`` order), by name within a store."""
    found = []
    for listing in (ollama_models, lmstudio_models, llamacpp_models, hf_cache_models):
        found += sorted(listing(), key=lambda e: e.name.lower())
    return found


def same_model(a: StoredGGUF, b: StoredGGUF) -> bool:
    """One file reached twice (a hard link, a symlink), or the same download kept by two tools (name and size)."""
    try:
        if os.path.samefile(a.path, b.path):
            return True
    except OSError:
        pass
    return a.size == b.size and a.path.name == b.path.name and a.path.suffix == ".gguf"


def find(spec: str, found: list[StoredGGUF] | None = None) -> list[StoredGGUF]:
    """The distinct models that ``spec`` names (case-insensitive): a store's own name first, then the other names
    (file stem, file name, long Ollama forms). More than one means the name is ambiguous."""
    found = discover() if found is None else found
    key = spec.strip().lower()
    for names in (lambda e: (e.name,), lambda e: e.also):
        hits: list[StoredGGUF] = []
        for e in found:
            if key in (n.lower() for n in names(e)) and not any(same_model(e, h) for h in hits):
                hits.append(e)
        if hits:
            return hits
    return []


# ---------------------------------------------------------------- a GGUF's identity and header
_DIGESTS = "gguf-digests.json"
_MAX_DIGESTS = 256
_SETTLE_S = 1.0
_digest_memo: dict[str, str] = {}


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes: the same for an Ollama blob, a hard link and a copy of one GGUF.

    Remembered (in the cache dir) per device, inode, size, mtime and ctime: a later call on the same file costs one
    ``stat``; a copy is hashed once; a file that was written to (its ctime moves, even if its mtime is set back) is
    hashed again. A file changed less than ``_SETTLE_S`` ago is not remembered: the clock behind ctime is coarse, so
    a second write in the same tick could otherwise leave the stamp unchanged."""
    st = os.stat(path)
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    if ident in _digest_memo:
        return _digest_memo[ident]
    settled = time.time() - max(st.st_mtime, st.st_ctime) > _SETTLE_S
    memo_file = cache_dir() / _DIGESTS
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    digest = memo.get(ident)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if not settled:
            return digest
        memo.pop(ident, None)
        memo[ident] = digest
        memo = dict(list(memo.items())[-_MAX_DIGESTS:])
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"{_DIGESTS}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo), encoding="utf-8")
            os.replace(tmp, memo_file)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    _digest_memo[ident] = digest
    return digest


def content_key(path: Path) -> str:
    """A file-system-safe name for a GGUF's bytes: its ``general.name`` (for people) and 20 hex digits of its sha256."""
    label = re.sub(r"[^\w.-]+", "-", str(gguf_general(path).get("general.name") or "gguf")).strip("-.")[:64] or "gguf"
    return f"{label}-{content_digest(path)[:20]}"

"""Compiled decode steps kept across launches: one entry per machine and everything the step depends on.

An entry is a directory ``<cache dir>/compiled/<key>/`` holding ``artifacts.bin`` (torch's portable compile
cache for the step: ``torch.compiler.save_cache_artifacts``, i.e. inductor's compiled graph with its generated
C++ built for this CPU) and ``meta.json`` (the key's fields in clear, the artifact's sha256 and size, how long the
compile took). ``meta.json`` is written last, so an entry without it (a crash mid-write) does not count.

The key holds everything the artifact depends on: the model (name, weights files by name/size/mtime, config),
quantization, dtype, attention kernel, context size (the cache buffers are static shapes in the graph), compile
backend and inductor options, fmchat's step code, torch / transformers / Python versions, the CPU capability
(``torch.backends.cpu.get_cpu_capability()``: inductor emits code for that ISA), the thread count (inductor
bakes it into its OpenMP loops) and, when ``fmchat_kernels.quant.select`` exists, its measured kernel choices.

Loading is never trusted blindly: the artifact's sha256 must match ``meta.json`` before torch sees the bytes, and
torch's own cache then checks the traced graph against its key again (a miss just compiles). Anything wrong (a
corrupt or truncated file, an unreadable meta, a loader error) discards the entry and the step is compiled
afresh and saved again: a stale or corrupt entry is rebuilt, never a crash.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fmchat import paths

FORMAT = 1  # bump when the entry layout changes
ARTIFACTS = "artifacts.bin"
AOT_PACKAGE = "step.pt2"
META = "meta.json"

# One compile of ours at a time per process: torch's artifact recorder is process-wide (what a save serializes is
# what was compiled since the last clear), and Dynamo config patches are global.
COMPILE_LOCK = threading.Lock()


@atexit.register
def _quiet_exit() -> None:
    """A process that exits while a background compile is under way (the daemon thread is abandoned): torch would
    log the errors of a trace cut short by the interpreter's shutdown on stderr. Nothing is lost (the entry is
    written only when complete), so say nothing."""
    if COMPILE_LOCK.locked():
        logging.disable(logging.CRITICAL)


def root() -> Path:
    return paths.compiled_dir()


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}|".encode())
    return h.hexdigest()[:16]


@functools.cache  # the code this process runs: hashed once (an edit on disk meets a new process)
def _source_hash() -> str:
    """fmchat's own code that shapes the traced step (the step and the cache/attention entry it calls). The kernels
    it traces (``fmchat_kernels``) are not hashed here: a change there traces a different graph, which torch's own
    cache key sees (a miss: the step is compiled afresh and the entry saved again)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in (here / "compiled.py", here / "fmc.py"):
        with contextlib.suppress(OSError):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def kernel_choices(formats: list[str] | None = None) -> dict | None:
    """The measured one-row product kernels (``fmchat_kernels.quant.select.current_choices()``), when that module
    exists: a different choice traces a different graph. ``formats``: the weight formats the model has (the choices
    are per process: a float32 model's key must not carry the bf16 choice an earlier load in the process made)."""
    try:
        from fmchat_kernels.quant import select  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(select, "current_choices", None)
    if fn is None:
        return None
    try:
        choices = json.loads(json.dumps(fn(), sort_keys=True, default=str))
    except Exception:  # noqa: BLE001 - a choice we cannot read is part of no key
        return {"unreadable": True}
    if formats is None or not isinstance(choices, dict):
        return choices
    used = {k: v for k, v in choices.items() if k in formats}
    return {**{k: v for k, v in choices.items() if k not in FORMAT_NAMES}, **used} if used else {}


def machine_fields() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


FORMAT_NAMES = ("bf16", "int8", "int4")
# The key fields that change with an upgrade, not with what the user runs: an entry differing from a new one only
# there is superseded (``Entry.prune_superseded``).
VERSION_FIELDS = ("format", "code", "torch", "transformers", "python", "kernel_choices")


def step_key(model: dict, load: dict, compile_options: dict, formats: list[str] | None = None) -> dict:
    """Every field the compiled artifact depends on, as a JSON-able dict (``model``: name, weights fingerprint,
    config hash; ``load``: quant, dtype, kernel, ctx, device; ``compile_options``: backend and inductor options)."""
    return {
        "format": FORMAT,
        "model": model,
        "load": load,
        "compile": compile_options,
        "code": _source_hash(),
        "kernel_choices": kernel_choices(formats),
        **machine_fields(),
    }


def weights_fingerprint(weights_dir: Path) -> dict:
    files = (
        sorted(weights_dir.glob("*.safetensors")) + sorted(weights_dir.glob("*.bin")) + [weights_dir / "config.json"]
    )
    return {"weights": _hash_files(files)}


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Entry:
    """One cached compiled step (may not exist yet)."""

    def __init__(self, key: dict, base: Path | None = None, artifact: str = ARTIFACTS):
        self.key = key
        self.dir = (base or root()) / digest(key)
        self.artifact = artifact  # ARTIFACTS (torch.compile's cache) or AOT_PACKAGE (an AOTInductor package)

    @property
    def artifacts(self) -> Path:
        return self.dir / self.artifact

    @property
    def meta_path(self) -> Path:
        return self.dir / META

    def exists(self) -> bool:
        return self.meta_path.is_file() and self.artifacts.is_file()

    def meta(self) -> dict | None:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def read(self) -> bytes:
        """The artifact's bytes, checked against meta.json. Raises ``StaleEntry`` (and discards the entry) when
        anything does not match."""
        meta = self.meta()
        if meta is None:
            raise StaleEntry("meta.json missing or unreadable")
        if meta.get("key") != json.loads(json.dumps(self.key, sort_keys=True, default=str)):
            raise StaleEntry("key mismatch")
        try:
            data = self.artifacts.read_bytes()
        except OSError as exc:
            raise StaleEntry(f"cannot read {self.artifact}: {exc}") from None
        if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise StaleEntry(f"{self.artifact} does not match its checksum (corrupt or truncated)")
        return data

    def write(self, data: bytes, compile_s: float) -> None:
        """Atomically (each file via a temporary and a rename; meta.json last)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.meta_path.unlink()
        _atomic_write(self.artifacts, data)
        meta = {"key": self.key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "compile_s": round(compile_s, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        _atomic_write(self.meta_path, json.dumps(meta, indent=1, sort_keys=True, default=str).encode())
        self.prune_superseded()

    def prune_superseded(self) -> list[Path]:
        """Remove the entries this one replaces: the same model, load options, compile options and machine, built by
        another version of fmchat's step code, torch, transformers, Python, the entry format or the kernel choices.
        Nothing would ever load them again (an upgrade leaves the old step behind: megabytes per model). Entries that
        differ otherwise (another model, context size, thread count...) are live and stay. Returns the removed dirs."""
        meta = self.meta() or {}
        mine = {k: v for k, v in (meta.get("key") or {}).items() if k not in VERSION_FIELDS}
        removed: list[Path] = []
        if not mine:
            return removed
        for meta_path in self.dir.parent.glob(f"*/{META}"):
            other = meta_path.parent
            if other == self.dir:
                continue
            try:
                key = json.loads(meta_path.read_text(encoding="utf-8")).get("key", {})
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(key, dict) and {k: v for k, v in key.items() if k not in VERSION_FIELDS} == mine:
                shutil.rmtree(other, ignore_errors=True)
                removed.append(other)
        return removed

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def expected_seconds(self) -> float | None:
        """How long the last compile of this step took here (for a progress estimate), when known."""
        meta = self.meta()
        v = meta.get("compile_s") if meta else None
        return float(v) if isinstance(v, (int, float)) else None


class StaleEntry(Exception):
    """A cached entry that cannot be used (it is discarded and rebuilt)."""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def inductor_dir():
    """Inductor's on-disk cache, for the duration of our compile, in fmchat's cache dir (``<cache>/compiled/inductor``)
    instead of ``/tmp/torchinductor_<user>``: there it keeps the C++ kernels it built (``.so``), which our artifact
    does not carry, across reboots. Measured (docs/decode.md): a launch that finds the artifact but not the ``.so``
    files rebuilds the C++ (16 s of a 73 s warm load for the default model; most of the warm load of a 2-layer
    model). ``$FMCHAT_INDUCTOR_DIR`` overrides the place ("-" leaves torch's own).

    One folder per CPU capability (``inductor/avx512``, ``inductor/avx2``): torch's graph cache does not key on it,
    so a launch capped to AVX2 (``ATEN_CPU_CAPABILITY=avx2``), or a cache dir shared with a machine of another ISA,
    would otherwise reuse kernels built for the other ISA (seen: AVX-512 loops run in an AVX2-capped process)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability().lower() or "default"
    place = os.environ.get("FMCHAT_INDUCTOR_DIR") or str(root() / "inductor" / cap)
    if place == "-":
        yield
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # pragma: no cover - another torch
        yield
        return
    Path(place).mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(place):
        yield


def clear_recorded_artifacts() -> None:
    """Forget the compile artifacts torch recorded so far in this process, so that the next save holds only the
    step compiled after this call (a private API: without it, a save holds more, which is harmless)."""
    with contextlib.suppress(Exception):
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()


def load_into_torch(data: bytes) -> None:
    """Hand the artifact to torch's local compile caches (the next compile of the same graph is a cache hit)."""
    import torch

    torch.compiler.load_cache_artifacts(data)


def save_from_torch() -> bytes | None:
    import torch

    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved else None


def cache_hits() -> int:
    """Inductor's FX-graph cache hits so far in this process (a cached step shows as one more)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_hit"])
    except Exception:  # noqa: BLE001
        return 0

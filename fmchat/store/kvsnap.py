"""KV-cache snapshots for the transformers backend: resume a saved chat without re-prefilling it.

A snapshot is a chain of safetensors files beside the database, 0600: ``kv/<session id>.safetensors`` holds the
keys and values of the first cached positions, and each later file ``kv/<session id>.<start>.safetensors`` the
positions from ``start`` on. After a reply only the new cells are written (a new file); a file whose positions
no longer match the ledger (a retry, a shift, an edited transcript) is removed with every file after it, and
the chain is written again from there. Each file records the ledger ids of its positions, a hash of the whole
ledger up to its end, and a fingerprint of the configuration that computed them (model weights, dtype,
quantization, kernel, device, transformers and torch versions).

On resume a chain is used only as far as the fingerprint equals the running backend's, the files follow each
other, each hash holds and the ledger agrees with the transcript's rendering; then only the agreeing prefix is
kept. Anything else: ignored, and the cache is rebuilt by prefill.

Snapshots are bounded: past ``cap_bytes`` in all (the ``--kv-snapshot-cap`` setting), the snapshots of the
sessions used least recently are dropped, leaving a marker so that resuming one says why it re-prefills.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import ExitStack
from itertools import pairwise
from pathlib import Path

import torch

from .files import kv_dir, snapshot_files

SNAPSHOT_FORMAT = "fmchat-kv/2"
DROPPED = ".dropped"  # marker file: kv/<id>.dropped says why the snapshot was dropped


def snapshot_path(store, session_id: str) -> Path:
    """The first file of the session's snapshot chain (positions from 0)."""
    from .files import snapshot_path as path_beside  # torch-free: the store's delete uses it too

    return path_beside(store.path, session_id)


def _chunk_path(store, session_id: str, start: int) -> Path:
    first = snapshot_path(store, session_id)
    return first if start == 0 else first.with_name(f"{session_id}.{start}.safetensors")


def _chain(store, session_id: str) -> list[tuple[int, Path]]:
    """(start, path) of the session's snapshot files, in position order."""
    out = []
    for path in snapshot_files(store.path, session_id):
        if path.name == f"{session_id}.safetensors":
            out.append((0, path))
        elif m := re.fullmatch(re.escape(session_id) + r"\.(\d+)\.safetensors", path.name):
            out.append((int(m.group(1)), path))
    return sorted(out)


class SnapshotMismatch(ValueError):
    pass


def _ledger_hash(ids) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def _read_meta(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001  unreadable: not part of a usable chain
        return None


def _valid_prefix(store, session_id: str, ledger: list[int], fingerprint: str) -> tuple[int, list[Path]]:
    """How many leading positions of ``ledger`` the files on disk hold as it is now, and the files past that."""
    covered, stale = 0, []
    for start, path in _chain(store, session_id):
        meta = None if stale or start != covered else _read_meta(path)
        ok = (
            meta is not None
            and meta.get("format") == SNAPSHOT_FORMAT
            and meta.get("fingerprint") == fingerprint
            and int(meta.get("end", -1)) <= len(ledger)
            and meta.get("prefix_sha256") == _ledger_hash(ledger[: int(meta.get("end", -1))])
        )
        if ok:
            covered = int(meta["end"])
        else:
            stale.append(path)
    return covered, stale


def _write(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(store, session_id: str, session, cap_bytes: int | None = None) -> Path | None:
    """Bring the session's snapshot up to its KV cache, writing only the positions not saved yet. Returns the first
    file written (None: nothing new, or the backend cannot export its cache). Then keeps all snapshots under
    ``cap_bytes`` (None: no cap)."""
    backend = session.backend
    from fmchat.backends.base import KVSnapshot

    if not isinstance(backend, KVSnapshot):
        return None
    fingerprint = json.dumps(backend.kv_fingerprint(), sort_keys=True)
    stale: list[Path] = []

    def saved(ledger: list[int]) -> int:
        covered, old = _valid_prefix(store, session_id, ledger, fingerprint)
        stale.extend(old)
        return covered

    snap = session.kv_snapshot(saved)
    if snap is None:
        return None
    ledger, start, layers = snap
    for path in stale:  # what no longer matches the cache goes first: the chain stays a chain
        path.unlink(missing_ok=True)
    (kv_dir(store.path) / f"{session_id}{DROPPED}").unlink(missing_ok=True)
    n = len(ledger)
    if start >= n:
        return None
    # The last reply's tokens go in a file of their own: the next turn re-renders the reply from its text, which
    # may tokenize differently at its end, and then only that small file is written again.
    cuts = [start, *([b] if start < (b := _last_prompt_end(session)) < n else []), n]
    path = None
    for a, b in pairwise(cuts):
        tensors: dict[str, torch.Tensor] = {"ledger": torch.tensor(ledger[a:b], dtype=torch.int64)}
        for i, (k, v) in enumerate(layers):
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k[:, :, a - start : b - start], v[:, :, a - start : b - start]
        meta = {"format": SNAPSHOT_FORMAT, "fingerprint": fingerprint, "start": str(a), "end": str(b),
                "prefix_sha256": _ledger_hash(ledger[:b]), "layers": str(len(layers))}  # fmt: skip
        written = _chunk_path(store, session_id, a)
        _write(written, {k: t.contiguous() for k, t in tensors.items()}, meta)
        path = path or written
    if cap_bytes is not None:
        enforce_cap(store, cap_bytes, keep=session_id)
    return path


def _last_prompt_end(session) -> int:
    """Where the last turn's prompt ends in the ledger (its reply follows), or 0 when unknown."""
    for m in reversed(session.messages):
        if m.role == "assistant":
            return (m.stats.prompt_tokens or 0) if m.stats is not None else 0
    return 0


def snapshot_bytes(store, session_id: str) -> int:
    return sum(p.stat().st_size for _, p in _chain(store, session_id))


def enforce_cap(store, cap_bytes: int, keep: str | None = None) -> list[str]:
    """Drop whole snapshots, least recently written first (``keep``'s last), until all fit in ``cap_bytes``.
    Returns the session ids dropped; each leaves a marker saying why."""
    kv = kv_dir(store.path)
    if not kv.is_dir():
        return []
    sizes: dict[str, int] = {}
    newest: dict[str, float] = {}
    for p in kv.glob("*.safetensors"):
        sid = p.name.split(".", 1)[0]
        st = p.stat()
        sizes[sid] = sizes.get(sid, 0) + st.st_size
        newest[sid] = max(newest.get(sid, 0.0), st.st_mtime)
    total = sum(sizes.values())
    dropped = []
    for sid in sorted(sizes, key=lambda s: (s == keep, newest[s])):
        if total <= cap_bytes:
            break
        for _, path in _chain(store, sid):
            path.unlink(missing_ok=True)
        total -= sizes[sid]
        (kv / f"{sid}{DROPPED}").write_text(
            f"dropped {time.strftime('%Y-%m-%d %H:%M')} to keep KV snapshots under {cap_bytes / 2**20:.0f} MiB\n"
        )
        dropped.append(sid)
    return dropped


def load(store, session_id: str, session) -> tuple[int, str]:
    """Fill the (empty) cache from the snapshot chain. Returns (tokens restored, why not / "ok")."""
    from fmchat.backends.base import KVSnapshot

    backend = session.backend
    if not isinstance(backend, KVSnapshot):
        return 0, f"the {backend.name} backend keeps its own cache"
    chain = _chain(store, session_id)
    if not chain or chain[0][0] != 0:
        marker = kv_dir(store.path) / f"{session_id}{DROPPED}"
        if marker.is_file():
            return 0, f"snapshot {marker.read_text(encoding='utf-8', errors='replace').strip()}"
        return 0, "no snapshot"
    fingerprint = json.dumps(backend.kv_fingerprint(), sort_keys=True)
    with ExitStack() as open_files:
        return _load_chain(session, chain, fingerprint, open_files)


def _load_chain(session, chain, fingerprint: str, open_files: ExitStack) -> tuple[int, str]:
    from safetensors import safe_open

    backend = session.backend
    files, ledger = [], []
    try:
        for start, path in chain:
            if start != len(ledger):
                break  # a gap: the chain ends here
            f = open_files.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                if not files:
                    return 0, "snapshot format differs"
                break
            if meta.get("fingerprint") != fingerprint:
                if not files:
                    return 0, "snapshot made with another model/dtype/quantization/kernel"
                break
            if int(meta.get("layers", -1)) != backend.kv_layers():
                return 0, "snapshot layer count differs"
            part = f.get_tensor("ledger").tolist()
            if int(meta.get("end", -1)) != len(ledger) + len(part) or meta.get("prefix_sha256") != _ledger_hash(ledger + part):
                if not files:
                    return 0, "snapshot ledger damaged"
                break
            files.append((f, len(part)))
            ledger += part
    except Exception as exc:  # noqa: BLE001  unreadable, truncated: not trusted (the cache is untouched)
        if not files:
            return 0, f"snapshot unreadable ({type(exc).__name__})"

    def load_layers(keep: int) -> list[tuple]:
        out = []
        for i in range(backend.kv_layers()):
            ks, vs, have = [], [], 0
            for f, n in files:
                if have >= keep:
                    break
                k, v = f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")
                if k.dim() != 4 or k.shape[2] != n or v.shape[2] != n:
                    raise SnapshotMismatch("snapshot tensor shapes do not match its ledger")
                take = min(n, keep - have)
                ks.append(k[:, :, :take])
                vs.append(v[:, :, :take])
                have += take
            out.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
        return out

    try:
        return session.restore_cache(ledger, load_layers)
    except SnapshotMismatch as exc:
        return 0, str(exc)
    except Exception as exc:  # noqa: BLE001  a file that breaks while its tensors are read: rebuilt by prefill
        return 0, f"snapshot unreadable ({type(exc).__name__})"

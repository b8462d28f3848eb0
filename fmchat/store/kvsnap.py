"""KV-cache snapshots for the transformers backend: resume a saved chat without re-prefilling it.

A snapshot is a safetensors file beside the database (``kv/<session id>.safetensors``, 0600) holding
every layer's keys and values for the cached tokens, the ledger (those tokens' ids) and a fingerprint
of the configuration that computed them (model weights, dtype, quantization, kernel, device,
transformers and torch versions). It is only ever used when the fingerprint equals the running
backend's, the tensors have the shapes the ledger says, and the ledger agrees with the transcript's
rendering; then only the agreeing prefix is kept. Anything else: ignored, and the cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

SNAPSHOT_FORMAT = "fmchat-kv/1"


def snapshot_path(store, session_id: str) -> Path:
    from .files import snapshot_path as path_beside  # torch-free: the store's delete uses it too

    return path_beside(store.path, session_id)


class SnapshotMismatch(ValueError):
    pass


def _ledger_hash(ids) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def save(store, session_id: str, session) -> Path | None:
    """Write the session's KV cache and ledger; None when the backend cannot export its cache."""
    snap = session.kv_snapshot()
    if snap is None:
        return None
    ledger, layers = snap
    tensors: dict[str, torch.Tensor] = {"ledger": torch.tensor(ledger, dtype=torch.int64)}
    for i, (k, v) in enumerate(layers):
        tensors[f"k.{i}"], tensors[f"v.{i}"] = k, v
    meta = {"format": SNAPSHOT_FORMAT, "fingerprint": json.dumps(session.backend.kv_fingerprint(), sort_keys=True),
            "ledger_sha256": _ledger_hash(ledger), "layers": str(len(layers)), "tokens": str(len(ledger))}  # fmt: skip
    from safetensors.torch import save_file

    path = snapshot_path(store, session_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # a reader sees the old snapshot or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load(store, session_id: str, session) -> tuple[int, str]:
    """Fill the (empty) cache from the snapshot. Returns (tokens restored, why not / "ok")."""
    from fmchat.backends.base import KVSnapshot

    backend = session.backend
    if not isinstance(backend, KVSnapshot):
        return 0, f"the {backend.name} backend keeps its own cache"
    path = snapshot_path(store, session_id)
    if not path.is_file():
        return 0, "no snapshot"
    from safetensors import safe_open

    def layers_of(f, ledger):
        def load_layers(keep: int) -> list[tuple]:
            out = []
            for i in range(backend.kv_layers()):
                k, v = f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")
                if k.dim() != 4 or k.shape[2] != len(ledger) or v.shape[2] != len(ledger):
                    raise SnapshotMismatch("snapshot tensor shapes do not match its ledger")
                out.append((k[:, :, :keep], v[:, :, :keep]))
            return out

        return load_layers

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                return 0, "snapshot format differs"
            if json.loads(meta.get("fingerprint", "{}")) != backend.kv_fingerprint():
                return 0, "snapshot made with another model/dtype/quantization/kernel"
            ledger = f.get_tensor("ledger").tolist()
            if _ledger_hash(ledger) != meta.get("ledger_sha256") or len(ledger) != int(meta.get("tokens", -1)):
                return 0, "snapshot ledger damaged"
            if int(meta.get("layers", -1)) != backend.kv_layers():
                return 0, "snapshot layer count differs"
            return session.restore_cache(ledger, layers_of(f, ledger))
    except SnapshotMismatch as exc:
        return 0, str(exc)
    except Exception as exc:  # noqa: BLE001  unreadable, truncated: whatever it is, not trusted (the cache is untouched)
        return 0, f"snapshot unreadable ({type(exc).__name__})"

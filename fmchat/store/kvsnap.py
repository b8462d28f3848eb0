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
    from .transcript import ID_RE

    if not ID_RE.fullmatch(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    return Path(store.path).parent / "kv" / f"{session_id}.safetensors"


def supported(backend) -> bool:
    return (
        getattr(backend, "name", "") == "transformers"
        and hasattr(backend, "cache")
        and hasattr(backend.cache, "layers")
    )


def fingerprint(backend) -> dict:
    """What the cached keys and values depend on, besides the tokens."""
    import transformers

    weights = Path(backend.load_report.weights_dir)
    files = []
    if weights.is_dir():
        for f in sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin")):
            st = f.stat()
            files.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return {
        "model": backend.model_name,
        "weights_dir": str(weights.resolve()) if weights.exists() else str(weights),
        "weights_files": hashlib.sha256("|".join(files).encode()).hexdigest()[:16],
        "dtype": backend.dtype,
        "quant": getattr(backend, "quant", "none"),
        "kernel": getattr(backend, "kernel", ""),
        "device": backend.device,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def _ledger_hash(ids) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def save(store, session_id: str, session) -> Path | None:
    """Write the session's KV cache and ledger; None when the backend cannot be snapshotted."""
    backend = session.backend
    if not supported(backend):
        return None
    n = len(session.ledger)
    if n == 0 or backend.cached_tokens() != n:
        return None
    tensors: dict[str, torch.Tensor] = {"ledger": torch.tensor(session.ledger, dtype=torch.int64)}
    for i, layer in enumerate(backend.cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            return None
        tensors[f"k.{i}"] = k[:, :, :n].detach().to("cpu").contiguous()
        tensors[f"v.{i}"] = v[:, :, :n].detach().to("cpu").contiguous()
    meta = {"format": SNAPSHOT_FORMAT, "fingerprint": json.dumps(fingerprint(backend), sort_keys=True),
            "ledger_sha256": _ledger_hash(session.ledger), "layers": str(len(backend.cache.layers)), "tokens": str(n)}  # fmt: skip
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
    from fmchat.engine.session import common_prefix

    backend = session.backend
    path = snapshot_path(store, session_id)
    if not supported(backend):
        return 0, f"the {getattr(backend, 'name', '?')} backend keeps its own cache"
    if not path.is_file():
        return 0, "no snapshot"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                return 0, "snapshot format differs"
            if json.loads(meta.get("fingerprint", "{}")) != fingerprint(backend):
                return 0, "snapshot made with another model/dtype/quantization/kernel"
            ledger = f.get_tensor("ledger").tolist()
            if _ledger_hash(ledger) != meta.get("ledger_sha256") or len(ledger) != int(meta.get("tokens", -1)):
                return 0, "snapshot ledger damaged"
            layers = len(backend.cache.layers)
            if int(meta.get("layers", -1)) != layers:
                return 0, "snapshot layer count differs"
            # Keep only what the transcript, rendered now, agrees with.
            msgs = session.template_messages()
            rendered = backend.render(msgs, add_generation_prompt=False) if msgs else []
            keep = common_prefix(ledger, rendered)
            if keep == 0:
                return 0, "snapshot does not match the transcript"
            if keep + 1 > session.ctx_size:
                return 0, "snapshot does not fit the context window"
            kv = [(f.get_tensor(f"k.{i}"), f.get_tensor(f"v.{i}")) for i in range(layers)]
    except Exception as exc:  # noqa: BLE001  unreadable, truncated, wrong shapes: whatever it is, not trusted
        return 0, f"snapshot unreadable ({type(exc).__name__})"
    for k, v in kv:
        if k.dim() != 4 or k.shape[2] != len(ledger) or v.shape[2] != len(ledger):
            return 0, "snapshot tensor shapes do not match its ledger"
    session._set_ledger(0)
    try:
        dev = backend.device
        for i, (k, v) in enumerate(kv):
            backend.cache.update(k[:, :, :keep].to(dev).contiguous(), v[:, :, :keep].to(dev).contiguous(), i)
        if backend.cached_tokens() != keep:
            raise ValueError("cache length after restore differs")
    except Exception as exc:  # noqa: BLE001  a cache that refuses the tensors: rebuilt by prefill instead
        session._set_ledger(0)
        return 0, f"snapshot did not fit this cache ({type(exc).__name__}: {exc})"
    session.ledger[:] = ledger[:keep]
    return keep, "ok"

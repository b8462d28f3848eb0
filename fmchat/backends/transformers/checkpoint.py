"""A safetensors checkpoint read one tensor at a time (``Checkpoint``): the header parsed once, each tensor read into
one reused staging buffer. The loader (``loading.py``) streams model weights through it; ``quant_store.py`` reads the
layout of the files it keeps with it."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmchat_kernels.quant.model import release_freed_memory

# safetensors dtype names -> torch dtypes (the ones a streamed load reads; others fall back to from_pretrained)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
# Checkpoint keys transformers ignores for every model (buffers that are no longer saved).
_IGNORED_KEYS = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


@dataclass(frozen=True)
class _Entry:
    file: int
    dtype: torch.dtype | None  # None: a dtype this reader does not know
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or shards listed by an index), read one at a time with
    plain reads into one staging buffer (the size of the largest tensor, reused): nothing stays mapped, and no
    freed read buffers are left between the loaded tensors (holes the allocator would keep)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}  # the files' ``__metadata__`` (string to string)
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, e in header.items():
                b, end = e["data_offsets"]
                self.entries[name] = _Entry(i, _DTYPES.get(e["dtype"]), tuple(e["shape"]), 8 + n + b, 8 + n + end)
        self._handles: dict[int, object] = {}
        self._stage: torch.Tensor | None = None
        self._maps: dict[int, torch.UntypedStorage] = {}

    @classmethod
    def find(cls, weights: Path) -> Checkpoint | None:
        """The checkpoint in an HF model dir, or None when it has no safetensors weights."""
        single, index = weights / "model.safetensors", weights / "model.safetensors.index.json"
        if single.is_file():
            return cls([single])
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([weights / s for s in shards])
        return None

    def float_dtypes(self) -> set[torch.dtype | None]:
        return {e.dtype for e in self.entries.values() if e.dtype is None or e.dtype.is_floating_point}

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, a view of the staging buffer: valid until the next read (copy what you keep)."""
        e = self.entries[name]
        f = self._handles.get(e.file)
        if f is None:
            f = self._handles[e.file] = open(self.files[e.file], "rb", buffering=0)  # noqa: SIM115 - closed by close()
        release_freed_memory()  # the previous tensor's temporaries: back to the OS, not left as holes in the heap
        if self._stage is None:
            self._stage = torch.empty(max(x.end - x.start for x in self.entries.values()), dtype=torch.uint8)
        out = self._stage[: e.end - e.start]
        view, done = memoryview(out.numpy()), 0
        f.seek(e.start)
        while done < len(view):  # raw reads may return less than asked (Linux: at most ~2 GiB per call)
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{self.files[e.file]}: file ends inside tensor {name}")
            done += got
        return out.view(e.dtype).reshape(e.shape)

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of its file mapped copy-on-write (``UntypedStorage.from_file(shared=False)``: the
        file's pages, resident once touched, no copy; one mapping per file, kept by the views)."""
        e = self.entries[name]
        if e.dtype is None:
            raise ValueError(f"'{name}' has a dtype this reader does not know")
        storage = self._maps.get(e.file)
        if storage is None:
            path = self.files[e.file]
            storage = self._maps[e.file] = torch.UntypedStorage.from_file(str(path), shared=False,
                                                                          nbytes=path.stat().st_size)  # fmt: skip
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, e.start, (e.end - e.start,), (1,))
        return raw.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._stage = None
        self._maps.clear()  # (views handed out keep their mapping)

    def plan(self, model: nn.Module) -> dict[str, str] | str:
        """Which checkpoint key holds each parameter of the skeleton ``model`` (named as ``model.named_parameters()``
        names it), or why the checkpoint does not map one to one onto the model."""
        if any(e.dtype is None for e in self.entries.values()):
            return "a tensor dtype this reader does not know"
        groups: dict[int, list[str]] = {}
        params: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            params[id(p)] = p
        keys = {}
        for pid, names in groups.items():
            key = next((n for n in names if n in self.entries), None)
            if key is None:
                return f"the checkpoint has no tensor '{names[0]}'"
            if self.entries[key].shape != tuple(params[pid].shape):
                return f"'{key}' has shape {self.entries[key].shape}, the model {tuple(params[pid].shape)}"
            keys[names[0]] = key
        expected = set(model.state_dict())
        own = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        ignored = [re.compile(p) for p in (*_IGNORED_KEYS, *own)]
        extra = [k for k in self.entries if k not in expected and not any(p.search(k) for p in ignored)]
        if extra:
            return f"checkpoint keys the model does not have ({', '.join(sorted(extra)[:3])}...)"
        return keys

    def load_buffers(self, model: nn.Module) -> None:
        """Persistent buffers the checkpoint holds (rare; non-persistent ones were computed by the modules)."""
        for name, buf in model.named_buffers():
            if name in self.entries and self.entries[name].shape == tuple(buf.shape):
                with torch.no_grad():
                    buf.copy_(self.read(name))


def tensor_holders(model: nn.Module, buffers: bool = False) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Each parameter (and, with ``buffers``, each buffer) of ``model`` by id, with every ``(module, "_parameters" or
    "_buffers", attribute)`` that holds it (tied weights: several). Replace a tensor everywhere with ``put``."""
    holders: dict[int, list] = {}
    for mod in model.modules():
        for kind in ("_parameters", "_buffers") if buffers else ("_parameters",):
            for attr, t in getattr(mod, kind).items():
                if t is not None:
                    holders.setdefault(id(t), []).append((mod, kind, attr))
    return holders


def put(holders: list[tuple[nn.Module, str, str]], t: torch.Tensor, requires_grad: bool = False) -> None:
    """Make ``t`` the tensor of every holder (a parameter where a parameter was, a buffer where a buffer was)."""
    param = None
    for mod, kind, attr in holders:
        if kind == "_parameters":
            if param is None:
                param = nn.Parameter(t, requires_grad=requires_grad)
            mod._parameters[attr] = param
        else:
            mod._buffers[attr] = t

"""Loading a model's weights within a memory budget: the peak while loading stays near the final weights.

Four ways, chosen per load (``Loaded.how`` says which):

* **mapped** — no conversion is needed (``--quant none``/``bf16``/``fp16`` and every float tensor of the checkpoint
  already has the dtype asked for, e.g. a bf16 checkpoint or a converted GGUF at the default dtype):
  transformers' ``from_pretrained``. It memory-maps the safetensors files and its parameters *are* the file's pages
  (no copy), so the weights are held once, as clean file-backed pages the OS can drop and read again.
* **streamed** — a dtype change (float32 from bf16, bf16 from a float32 checkpoint) or ``int8``/``int4``/``log8``:
  the model is built as a skeleton (parameters on the meta device; buffers such as RoPE's ``inv_freq`` computed for
  real by the modules themselves), then each tensor is read from the safetensors files with plain reads (no mmap:
  pages read through a mapping would count as resident until the mapping is closed) and converted to its dtype, or
  quantized as it arrives by ``fmchat_kernels.quant.quantize_model(..., fetch=...)``, and its read buffer dropped
  before the next tensor is read. Peak = the final weights + about one tensor as read + the quantizer's per-chunk
  float32 temporaries (``QUANT_CHUNK_ELEMS``).
* **stored** — an integer scheme on the CPU whose codes an earlier streamed load kept (``quant_store.py``): the
  quantized structure is built on the meta device and the kept file's tensors mapped copy-on-write into it.
* **full** — a checkpoint the streamed path cannot map one to one onto the model (``.bin`` files, keys transformers
  renames or fuses, a pre-quantized checkpoint): ``from_pretrained`` as before (integer schemes: at float32, then
  quantized in place), so the peak is that of a float32 model.

Nothing here decides what a scheme computes: the quantized codes equal those ``quantize_model`` makes from a float32
copy of the model, bit for bit.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmchat_kernels.quant.model import release_freed_memory

from ..base import ProgressFn
from .gguf import counted_tensor_loop

# safetensors dtype names -> torch dtypes (the ones a streamed load reads; others fall back to from_pretrained)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
# Checkpoint keys transformers ignores for every model (buffers that are no longer saved).
_IGNORED_KEYS = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


@dataclass
class Loaded:
    model: nn.Module
    quant_report: object | None  # fmchat_kernels.quant.QuantReport when a scheme was applied
    how: str  # "mapped", "streamed", or "full (<why the streamed path was not used>)"


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

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._stage = None

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


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init cost) and their buffers for real,
    computed by the modules' own code (RoPE's inv_freq, ...), so nothing has to be recomputed after loading."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(weights: Path, dtype: torch.dtype, kernel: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(weights))
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=kernel)
    model.config.name_or_path = str(weights)
    if (weights / "generation_config.json").is_file():  # as from_pretrained does (the eos ids live there)
        model.generation_config = GenerationConfig.from_pretrained(str(weights))
    return model


def _why_not_streamed(weights: Path, ckpt: Checkpoint | None) -> str | None:
    if ckpt is None:
        return "no safetensors weights"
    config = json.loads((weights / "config.json").read_text()) if (weights / "config.json").is_file() else {}
    if config.get("quantization_config"):
        return "a pre-quantized checkpoint"
    return None


def _why_not_plan(model: nn.Module, keys: dict[str, str] | str, integer: bool, dtype: torch.dtype) -> str | None:
    if isinstance(keys, str):
        return keys
    keep = getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)
    if keep and not integer and dtype != torch.float32:  # from_pretrained keeps these in float32: let it
        return f"modules kept in float32 ({', '.join(sorted(keep))})"
    return None


def _tensor_progress(progress: ProgressFn, label: str):
    """Report transformers' per-tensor loading loop as progress, every tensor."""
    return counted_tensor_loop(
        "transformers.core_model_loading", lambda done, total: progress(f"{label}: {done}/{total} tensors", done / total)
    )


def _from_pretrained(weights: Path, dtype: torch.dtype, kernel: str, progress: ProgressFn, label: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _tensor_progress(progress, label):
        return AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype, attn_implementation=kernel)


def _parameter_holders(model: nn.Module) -> tuple[dict[int, list], dict[int, str]]:
    """Each parameter (by id) with every ``(module, attribute, parameter)`` that holds it (tied weights: several), and
    its name in ``named_parameters()``."""
    holders: dict[int, list] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mod, attr, p))
    return holders, {id(p): name for name, p in model.named_parameters()}


def _map_into_skeleton(weights: Path, ckpt: Checkpoint, dtype: torch.dtype, kernel: str, progress: ProgressFn,
                       label: str) -> nn.Module | None:  # fmt: skip
    """The mapped load without ``from_pretrained``: a skeleton (``_skeleton``), whose parameters then become views of
    the safetensors files mapped copy-on-write (``UntypedStorage.from_file(shared=False)``: the file's pages, resident
    once touched, no copy), as ``from_pretrained`` maps them. The same tensors, several times cheaper: on SmolLM2
    ``from_pretrained`` spent ~0.3 s of every launch building its key-conversion regexes and drawing random init
    weights for parameters the checkpoint then replaces. None when the checkpoint does not map one to one onto the
    skeleton (missing, extra or reshaped keys, another dtype, modules kept in float32): the caller then uses
    ``from_pretrained``."""
    model = _skeleton(weights, dtype, kernel)
    keys = ckpt.plan(model)
    if _why_not_plan(model, keys, False, dtype) is not None:
        return None
    assert isinstance(keys, dict)
    holders, names = _parameter_holders(model)
    storages: dict[int, torch.UntypedStorage] = {}
    tensors = []
    for group in holders.values():
        p = group[0][2]
        e = ckpt.entries[keys[names[id(p)]]]
        if e.dtype != p.dtype or e.start % max(1, p.element_size()):
            return None
        if e.file not in storages:
            path = ckpt.files[e.file]
            storages[e.file] = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        raw = torch.empty(0, dtype=torch.uint8).set_(storages[e.file], e.start, (e.end - e.start,), (1,))
        tensors.append((group, raw.view(e.dtype).reshape(e.shape)))
    ckpt.load_buffers(model)
    n = len(tensors)
    for i, (group, t) in enumerate(tensors, 1):
        new = nn.Parameter(t, requires_grad=group[0][2].requires_grad)
        for mod, attr, _ in group:
            mod._parameters[attr] = new
        progress(f"{label}: {i}/{n} tensors", i / n)
    return model


def _stream_cast(model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], device: str, progress: ProgressFn) -> None:
    """Load every (meta) parameter of the skeleton at its own dtype, one tensor at a time."""
    holders, names = _parameter_holders(model)
    n = len(holders)
    for i, group in enumerate(holders.values(), 1):
        p = group[0][2]
        # straight to the dtype, as from_pretrained converts; a copy, since the read is a view of the staging buffer
        t = ckpt.read(keys[names[id(p)]]).to(device=device, dtype=p.dtype, copy=True)
        new = nn.Parameter(t, requires_grad=p.requires_grad and t.is_floating_point())
        for mod, attr, _ in group:
            mod._parameters[attr] = new
        del t, new
        progress(f"loading weights ({str(p.dtype).removeprefix('torch.')}): {i}/{n} tensors", i / n)


def load_weights(
    weights: Path, *, quant: str, integer: bool, dtype: torch.dtype, kernel: str, device: str, progress: ProgressFn
) -> Loaded:
    """The model in ``weights`` on ``device``: at ``dtype`` (``quant`` none, or a cast scheme whose dtype ``dtype``
    is), or quantized with the integer scheme ``quant`` and everything else at ``dtype``."""
    from fmchat_kernels.quant import quantize_model

    ckpt = Checkpoint.find(weights)
    try:
        why = _why_not_streamed(weights, ckpt)
        if why is None and not integer and ckpt.float_dtypes() <= {dtype}:
            label = f"mapping weights ({str(dtype).removeprefix('torch.')})"
            model = _map_into_skeleton(weights, ckpt, dtype, kernel, progress, label) if device == "cpu" else None
            if model is None:  # a layout the skeleton cannot take one to one (or a GPU load): transformers maps it
                model = _from_pretrained(weights, dtype, kernel, progress, label)
            how = "mapped"
        elif why is None:
            # integer schemes: a float32 skeleton, as the in-place path quantizes a float32 model
            model = _skeleton(weights, torch.float32 if integer else dtype, kernel)
            keys = ckpt.plan(model)
            why = _why_not_plan(model, keys, integer, dtype)
            if why is None:
                ckpt.load_buffers(model)
                if integer:
                    from . import quant_store

                    store = quant_store.entry(weights, quant, dtype, device)
                    if store is not None and store.exists():
                        report = quant_store.load(model, store, quant, dtype, progress)
                        if report is not None:
                            return Loaded(model.eval(), report, "stored")
                        model = _skeleton(weights, torch.float32, kernel)  # the failed try changed the structure
                        ckpt.load_buffers(model)
                    fetch = lambda name: ckpt.read(keys[name])
                    report = quantize_model(model, quant, rest_dtype=dtype, device=device, progress=progress,
                                            fetch=fetch)  # fmt: skip
                    if store is not None:
                        quant_store.save(model, store, progress)
                    return Loaded(model.to(device).eval(), report, "streamed")
                _stream_cast(model, ckpt, keys, device, progress)
                release_freed_memory()
                how = "streamed"
            else:
                del model
        if why is not None:
            progress(f"loading weights in full first ({why})", None)
            model = _from_pretrained(weights, torch.float32 if integer else dtype, kernel, progress, "loading weights")
            how = f"full ({why})"
    finally:
        if ckpt is not None:
            ckpt.close()
    model.to(device).eval()
    report = None
    if quant != "none":  # cast schemes mark the model (and cast its buffers); integer ones quantize the float32 model
        report = quantize_model(model, quant, rest_dtype=dtype, progress=progress)
    return Loaded(model, report, how)

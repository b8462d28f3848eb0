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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmchat_kernels.quant.model import release_freed_memory

from ..base import ProgressFn
from . import quant_store
from .checkpoint import Checkpoint, put, tensor_holders
from .gguf import counted_tensor_loop


@dataclass
class Loaded:
    model: nn.Module
    quant_report: object | None  # fmchat_kernels.quant.QuantReport when a scheme was applied
    how: str  # "mapped", "streamed", "stored", or "full (<why the streamed path was not used>)"


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


def _parameter_holders(model: nn.Module) -> tuple[dict[int, list], dict[int, torch.nn.Parameter], dict[int, str]]:
    """``tensor_holders`` of the parameters, each parameter by id, and its name in ``named_parameters()``."""
    params = dict(model.named_parameters())
    return tensor_holders(model), {id(p): p for p in params.values()}, {id(p): name for name, p in params.items()}


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
    holders, params, names = _parameter_holders(model)
    tensors = []
    for pid, group in holders.items():
        p = params[pid]
        e = ckpt.entries[keys[names[pid]]]
        if e.dtype != p.dtype or e.start % max(1, p.element_size()):
            return None
        tensors.append((group, ckpt.mapped(keys[names[pid]]), p.requires_grad))
    ckpt.load_buffers(model)
    n = len(tensors)
    for i, (group, t, requires_grad) in enumerate(tensors, 1):
        put(group, t, requires_grad)
        progress(f"{label}: {i}/{n} tensors", i / n)
    return model


def _stream_cast(model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], device: str, progress: ProgressFn) -> None:
    """Load every (meta) parameter of the skeleton at its own dtype, one tensor at a time."""
    holders, params, names = _parameter_holders(model)
    n = len(holders)
    for i, (pid, group) in enumerate(holders.items(), 1):
        p = params[pid]
        # straight to the dtype, as from_pretrained converts; a copy, since the read is a view of the staging buffer
        t = ckpt.read(keys[names[pid]]).to(device=device, dtype=p.dtype, copy=True)
        put(group, t, p.requires_grad and t.is_floating_point())
        del t
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

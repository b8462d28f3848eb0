"""GGUF -> safetensors: a GGUF file is converted once into a model directory in the user cache dir
(transformers dequantizes it, tensor by tensor, with progress); later loads read the converted copy.

The copy is written in bfloat16 (``CONVERTED_DTYPE``): half the bytes of float32 on disk, and exactly what the
default dtype loads (a float32 run upcasts it). GGUF's quantized blocks carry fewer than 8 significant bits
per weight, so bfloat16 (8 bits of mantissa) keeps nearly all of a Q4/Q5 file's precision."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_model

from fmchat.paths import cache_dir

from ..base import ProgressFn, no_progress

CONVERTED_MARKER = "fmchat-converted.json"
CONVERTED_DTYPE = torch.bfloat16
# one_reader swaps two module attributes for the process: one conversion at a time holds them
_ONE_READER = threading.Lock()


def _gguf_key(path: Path) -> str:
    """What the file holds, not where it is: the same bytes reached as an Ollama blob, an LM Studio file, a hard link
    or a copy share one conversion, and a changed file gets a new one (see ``model_stores.content_key``)."""
    from fmchat import model_stores

    return f"{model_stores.content_key(path)}-bf16"  # the dtype in the key: a float32 copy from an older fmchat is not reused


def converted_dir(gguf: Path) -> Path:
    return cache_dir() / "converted" / _gguf_key(gguf)


def quiet_transformers() -> None:
    """fmchat reports progress itself: keep transformers' progress bars and warnings off the terminal.
    (The GGUF converter's own tqdm bar ignores this switch: fmchat.cli sets TQDM_DISABLE before torch loads.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextmanager
def counted_tensor_loop(module_name: str, report: Callable[[int, int], None]) -> Iterator[None]:
    """While the block runs, call ``report(done, total)`` after each item of the tensor loop in transformers module
    ``module_name`` (the loop iterates through the ``tqdm`` that module imported); where a transformers version has no
    such module or loop, the block simply runs without reports."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        yield
        return
    real = getattr(module, "tqdm", None)
    if real is None:
        yield
        return

    def counted(iterable, *args, **kwargs):
        items = list(iterable)
        for i, item in enumerate(items, 1):
            yield item
            report(i, len(items))

    module.tqdm = counted
    try:
        yield
    finally:
        module.tqdm = real


def _tensor_progress(progress: ProgressFn, start: float, end: float, steps: int = 10):
    """Report transformers' GGUF tensor loop as progress, about ``steps`` times, between ``start`` and ``end``."""

    def report(done: int, total: int) -> None:
        if done % max(1, total // steps) == 0 or done == total:
            progress(f"dequantizing GGUF tensors: {done}/{total}", start + (end - start) * done / total)

    return counted_tensor_loop("transformers.modeling_gguf_pytorch_utils", report)


@contextmanager
def one_reader(path: Path) -> Iterator[None]:
    """While the block runs, ``path``'s header is parsed once. transformers opens the file three times in a conversion
    (for the tokenizer, the config, then the tensors), each time with a new ``gguf.GGUFReader``, which parses every
    item of the header's arrays into numpy views (over 10 s for Gemma 3's 262k-token vocabulary), and twice parses
    that header into the same metadata dicts. Within the block, every read-only ``GGUFReader(path)`` is one reader
    (a read-only memory map: sharing it changes nothing read), and the metadata-only ``load_gguf_checkpoint`` of
    ``path`` is computed once and handed out as copies. Other files, and other modes, go through as before."""
    import copy

    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    target = os.path.realpath(path)
    shared: dict = {}
    with _ONE_READER:  # (taken before reading the attributes: another conversion's stand-ins are never "real")
        real_reader, real_load = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint

        def reader(p, mode="r"):
            if mode != "r" or os.path.realpath(p) != target:
                return real_reader(p, mode)
            if "reader" not in shared:
                shared["reader"] = real_reader(p, mode)
            return shared["reader"]

        def load(p, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs or os.path.realpath(p) != target:
                return real_load(p, return_tensors, *args, **kwargs)
            if "metadata" not in shared:
                shared["metadata"] = real_load(p, False)
            return copy.deepcopy(shared["metadata"])

        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, load
        try:
            yield
        finally:
            gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = real_reader, real_load
            shared.clear()


def convert_gguf(gguf: Path, progress: ProgressFn = no_progress) -> Path:
    """Convert a GGUF file to a safetensors model dir in the cache (once); return that dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(gguf)
    if (out / CONVERTED_MARKER).is_file():
        return out
    progress(f"converting {gguf.name} to safetensors (first load only)", 0.0)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with one_reader(gguf):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        progress("dequantizing GGUF weights", 0.1)
        with _tensor_progress(progress, 0.1, 0.7):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=CONVERTED_DTYPE)
    progress("writing safetensors (bfloat16)", 0.7)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained: write the
    # dequantized tensors with safetensors and the config without the GGUF quantization entry.
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(tmp))
    model.generation_config.save_pretrained(str(tmp))
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size, "dtype": "bfloat16"}))
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a half-written conversion is never used
    progress("conversion done", 1.0)
    return out



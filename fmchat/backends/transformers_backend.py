"""The PyTorch/transformers backend: full introspection of weights, KV cache and memory.

GGUF files are converted once to safetensors in the user cache dir (transformers dequantizes them);
later loads read the converted copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_model

from fmchat import models
from fmchat.paths import cache_dir

from .base import LoadOptions, LoadReport, ProgressFn, no_progress

DEFAULT_CTX_CAP = 8192  # context window when the user sets none and the model allows more (tokens)
CONVERTED_MARKER = "fmchat-converted.json"
QUANT_SCHEMES = ("none", "bf16", "fp16", "int8", "int4", "log8")  # kernels/quant
QUANT_INT = ("int8", "int4", "log8")
KERNELS = ("sdpa", "eager", "fmc")  # transformers' own attention implementations, and fmchat's (backends/fmc.py)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return names[dtype]


def _gguf_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def converted_dir(gguf: Path) -> Path:
    return cache_dir() / "converted" / _gguf_key(gguf)


def _quiet_transformers() -> None:
    """fmchat reports progress itself: keep transformers' tqdm bars and warnings off the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own tqdm bar ignores the switch above


def convert_gguf(gguf: Path, progress: ProgressFn = no_progress) -> Path:
    """Convert a GGUF file to a safetensors model dir in the cache (once); return that dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(gguf)
    if (out / CONVERTED_MARKER).is_file():
        return out
    progress(f"converting {gguf.name} to safetensors (first load only)", 0.0)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress("dequantizing GGUF weights", 0.3)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    progress("writing safetensors", 0.7)
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
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a half-written conversion is never used
    progress("conversion done", 1.0)
    return out


class TransformersBackend:
    name = "transformers"

    def __init__(self, source: models.ModelSource, options: LoadOptions = LoadOptions(), progress: ProgressFn = no_progress):
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

        t0 = time.perf_counter()
        _quiet_transformers()
        self._dev = pick_device(options.device)
        self._dtype = pick_dtype(options.dtype, self._dev)
        self.quant = options.quant
        if self.quant not in QUANT_SCHEMES:
            raise ValueError(f"unknown quantization '{self.quant}' (use {', '.join(QUANT_SCHEMES)})")
        if self.quant in ("bf16", "fp16"):
            self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.quant]
        converted = False
        if source.kind == "gguf":
            assert source.path is not None
            converted = not (converted_dir(source.path) / CONVERTED_MARKER).is_file()
            weights = convert_gguf(source.path, progress)
        else:
            progress(f"locating {source.name}", None)
            weights = models.local_dir(source)
        progress("loading tokenizer", None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(weights))
        if not self.tokenizer.chat_template:
            raise models.ModelNotFound(f"model '{source.name}' has no chat template in its tokenizer; fmchat needs a chat model")
        progress(f"loading weights ({self._dtype_name()}, {self._dev})", None)
        if options.kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel '{options.kernel}' (available: {', '.join(KERNELS)})")
        self.kernel = options.kernel
        self.compile_status = "off"  # decode step: "off", "compiled (...)", or "eager: <why compile failed>"
        if options.compile != "off" and self.kernel != "fmc":
            self.kernel = "fmc"  # the compiled step needs the preallocated cache (fixed shapes)
        if self.kernel == "fmc":
            from .fmc import register

            register()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(weights), dtype=torch.float32 if self.quant in QUANT_INT else self._dtype, attn_implementation=self.kernel
        )
        self.model.to(self._dev).eval()
        if self.quant != "none":  # int schemes quantize from the fp32 originals, then cast the rest to dtype
            from kernels.quant import quantize_model

            self.quant_report = quantize_model(self.model, self.quant, rest_dtype=self._dtype, progress=progress)
        self._cache_cls = DynamicCache

        self.model_name = source.name
        self.device = self._dev
        self.dtype = self._dtype_name()
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        self.ctx_size = min(options.ctx, max_pos) if options.ctx else min(DEFAULT_CTX_CAP, max_pos)
        self.cache = self._new_cache()  # after ctx_size: the fmc cache is preallocated to it
        self.eos_token_ids = frozenset(self._eos_ids())
        self._weights_bytes = self._count_weights_bytes()
        self._step = None
        if options.compile != "off":
            self._compile_step(options.compile, progress)
        self.load_report = LoadReport(time.perf_counter() - t0, converted, str(weights))
        progress("ready", 1.0)

    # ---------------------------------------------------------------- helpers
    def _dtype_name(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    def _new_cache(self):
        if self.kernel == "fmc":
            from .fmc import FmcCache

            return FmcCache(self.model.config, self.ctx_size, dtype=self._dtype, device=self._dev)
        return self._cache_cls(config=self.model.config)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        return ids

    def _count_weights_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def _compile_step(self, choice: str, progress: ProgressFn) -> None:
        """Compile the one-token decode step once (at load); on any failure stay eager and say why."""
        from .compiled import CompiledStep

        progress("compiling decode step (once per model and options)", None)
        try:
            step = CompiledStep(self.model, self.cache, self._dev, choice)
            seconds = step.warm_up()
        except Exception as exc:  # noqa: BLE001 - any compiler error means: decode eagerly, and report it
            self.cache.crop_to(0)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.compile_status = f"eager: compile failed ({type(exc).__name__}: {first})"
            progress(f"compile failed, decoding eagerly: {type(exc).__name__}", None)
            return
        self._step = step
        self.compile_status = f"compiled ({step.backend}, {seconds:.1f} s)"

    @property
    def decode_path(self) -> str:
        """How one-token steps run: "eager", "compiled (...)" or "eager: compile failed (...)"."""
        return "eager" if self.compile_status == "off" else self.compile_status

    # ---------------------------------------------------------------- protocol
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def cached_tokens(self) -> int:
        return int(self.cache.get_seq_length())

    def truncate(self, n: int) -> None:
        if self.kernel == "fmc":  # preallocated: cropping only lowers the fill lengths
            self.cache.crop_to(max(n, 0))
        elif n <= 0:
            self.cache = self._new_cache()
        else:
            drop = self.cached_tokens() - n
            if drop > 0:
                self.cache.crop(-drop)  # transformers 5: a negative count removes that many tokens

    @torch.inference_mode()
    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        past = self.cached_tokens()
        if self._step is not None and len(ids) == 1 and past > 0:
            if past + 1 > self.ctx_size:
                raise ValueError(f"fmc KV cache is full: {past} + 1 tokens > {self.ctx_size}")
            return self._step(int(ids[0]), past)
        input_ids = torch.tensor([list(ids)], device=self._dev)
        pos = torch.arange(past, past + len(ids), device=self._dev)
        out = self.model(
            input_ids=input_ids,
            past_key_values=self.cache,
            use_cache=True,
            cache_position=pos,
            position_ids=pos.unsqueeze(0),
            logits_to_keep=1,
        )
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def forward_all(self, ids: Sequence[int]) -> torch.Tensor:
        """Like forward, but the logits of every position [n, vocab] (for perplexity)."""
        past = self.cached_tokens()
        pos = torch.arange(past, past + len(ids), device=self._dev)
        out = self.model(input_ids=torch.tensor([list(ids)], device=self._dev), past_key_values=self.cache,
                         use_cache=True, cache_position=pos, position_ids=pos.unsqueeze(0))  # fmt: skip
        return out.logits[0].float()

    @torch.inference_mode()
    def shift(self, n_keep: int, n_discard: int) -> str | None:
        """Remove cached positions [n_keep, n_keep + n_discard) and re-rotate the later keys to their new
        positions, so nothing is re-prefilled. Returns None when done, or why it cannot be done exactly."""
        from fmchat.memory.rope import rope_inv_freq, shift_kv

        inv_freq, why = rope_inv_freq(self.model)
        if inv_freq is None:
            return why
        orig = getattr(self.model.config, "original_max_position_embeddings", None)
        if "longrope" in why and orig and self.ctx_size > orig:
            return f"longrope switches frequencies past {orig} tokens and this window is {self.ctx_size}"
        total = self.cached_tokens()
        if n_discard <= 0 or n_keep + n_discard > total:
            return f"nothing to shift ({n_keep}+{n_discard} of {total} tokens)"
        for layer in self.cache.layers:
            if self.kernel == "fmc":  # preallocated buffers: shift in place, then lower the fill
                k, v = shift_kv(layer.keys[:, :, :total], layer.values[:, :, :total], n_keep, n_discard, inv_freq)
                layer.keys[:, :, : k.shape[2]] = k
                layer.values[:, :, : v.shape[2]] = v
            else:
                layer.keys, layer.values = (
                    t.contiguous() for t in shift_kv(layer.keys, layer.values, n_keep, n_discard, inv_freq)
                )
        if self.kernel == "fmc":
            self.cache.crop_to(total - n_discard)
        return None

    def seq_lens(self) -> list[int]:
        if self.kernel == "fmc":
            return self.cache.seq_lens_list()
        return [self.cached_tokens()]

    def kv_bytes(self) -> int | None:
        # Count the storage really held (a cropped cache may still hold a larger buffer behind a view).
        seen, total = set(), 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
        return total

    def weights_bytes(self) -> int | None:
        return self._weights_bytes

    def accelerator_mem_mb(self) -> float | None:
        if self._dev == "cuda":
            return torch.cuda.memory_allocated() / (1024 * 1024)
        return None

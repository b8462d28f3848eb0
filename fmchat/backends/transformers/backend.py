"""The PyTorch/transformers backend: full introspection of weights, KV cache and memory.

GGUF files are converted once to safetensors (``gguf.py``); the cache is transformers' DynamicCache, or
fmchat's preallocated FmcCache with ``--kernel fmc`` (``fmc.py``); ``--compile on`` runs the one-token step
compiled (``compiled.py``). This backend owns its cache and does all the surgery on it: crop, shift
(``rope.py``), snapshot export and import.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fmchat import models, registry, templates
from fmchat.errors import UserError

from ..base import AllLogits, KVShift, KVSnapshot, LoadReport, ProgressFn, TokenBackend, no_progress
from .compat import CACHE_ARG
from .gguf import CONVERTED_MARKER, convert_gguf, converted_dir, quiet_transformers

if TYPE_CHECKING:
    from fmchat.config import RunConfig

DEFAULT_CTX_CAP = 8192  # context window when the user sets none and the model allows more (tokens)


def _model_type(weights: Path) -> str | None:
    """The ``model_type`` of an HF model dir's config.json (None when it does not say)."""
    try:
        return json.loads((weights / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if dtype not in names:
        raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return names[dtype]


def full_length_layers(cache):
    """``cache`` with every sliding-window layer replaced by a full-length one. transformers' sliding layers keep only
    their window, and then cannot be cropped back (a retry or an edit after the window has filled raised in
    ``crop``) nor exported by position; the attention masks still apply each layer's window. Costs the memory of
    the cells outside the window, as llama.cpp's "full-size SWA cache" and fmc's cache do."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


class TransformersBackend(TokenBackend, KVShift, KVSnapshot, AllLogits):
    name = "transformers"

    def __init__(self, source: models.ModelSource, options: RunConfig, progress: ProgressFn = no_progress):
        t0 = time.perf_counter()
        quiet_transformers()
        from transformers import AutoTokenizer, DynamicCache

        self._dev = pick_device(options.device)
        self._dtype = pick_dtype(options.dtype, self._dev)
        self.quant = options.quant
        registry.QUANTS.require(self.quant)
        quant_caps = registry.QUANTS.entry(self.quant).capabilities
        if "cast" in quant_caps:  # bf16 / fp16: the whole model at that dtype
            self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.quant]
        converted = False
        template: templates.ChatTemplate | None = None
        if source.kind == "gguf":
            assert source.path is not None
            converted = not (converted_dir(source.path) / CONVERTED_MARKER).is_file()
            if converted:  # decide the chat template from the GGUF's metadata before the (long) conversion runs
                progress("reading GGUF metadata (chat template)", None)
                template = templates.for_gguf(source.path, options.chat_template)
            weights = convert_gguf(source.path, progress)
        else:
            progress(f"locating {source.name}", None)
            weights = models.local_dir(source)
        progress("loading tokenizer", None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(weights))
        vocab = self.tokenizer.get_vocab()
        if template is None:  # an HF dir, or a GGUF converted before: the tokenizer and config say it all
            template = templates.resolve(options.chat_template, templates.own_template(self.tokenizer.chat_template),
                                         _model_type(weights), vocab)  # fmt: skip
        self.template = template
        self.chat_template = template.describe()
        self.chat_template_own = template.own
        progress(f"loading weights ({self._dtype_name()}, {self._dev})", None)
        registry.KERNELS.require(options.kernel)
        self.kernel = options.kernel
        self.compile_status = "off"  # decode step: "off", "compiled (...)", or "eager: <why compile failed>"
        if options.compile != "off" and self.kernel != "fmc":
            self.kernel = "fmc"  # the compiled step needs the preallocated cache (fixed shapes)
        if self.kernel == "fmc":
            from .fmc import register

            register()
        from .loading import load_weights  # within a memory budget: see loading.py

        loaded = load_weights(weights, quant=self.quant, integer="integer" in quant_caps, dtype=self._dtype,
                              kernel=self.kernel, device=self._dev, progress=progress)  # fmt: skip
        self.model = loaded.model
        self.quant_report = loaded.quant_report  # what quantize_model did (kernels/quant), when a scheme was applied
        self.weights_load = loaded.how  # "mapped", "streamed" or "full (why)"
        self._cache_cls = DynamicCache

        self.model_name = source.name
        self.device = self._dev
        self.dtype = self._dtype_name()
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        self.ctx_size = min(options.ctx, max_pos) if options.ctx else min(DEFAULT_CTX_CAP, max_pos)
        self.cache = self._new_cache()  # after ctx_size: the fmc cache is preallocated to it
        self.eos_token_ids = frozenset(self._eos_ids() | templates.stop_ids(self.template, vocab.get))
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
        return full_length_layers(self._cache_cls(config=self.model.config))

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

    # ---------------------------------------------------------------- TokenBackend
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), chat_template=self.template.source, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)  # fmt: skip
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
            **{CACHE_ARG: self.cache},
            use_cache=True,
            cache_position=pos,
            position_ids=pos.unsqueeze(0),
            logits_to_keep=1,
        )
        return out.logits[0, -1].float()

    # ---------------------------------------------------------------- AllLogits
    @torch.inference_mode()
    def forward_all(self, ids: Sequence[int]) -> torch.Tensor:
        """Like forward, but the logits of every position [n, vocab] (for perplexity)."""
        past = self.cached_tokens()
        pos = torch.arange(past, past + len(ids), device=self._dev)
        out = self.model(input_ids=torch.tensor([list(ids)], device=self._dev), **{CACHE_ARG: self.cache},
                         use_cache=True, cache_position=pos, position_ids=pos.unsqueeze(0))  # fmt: skip
        return out.logits[0].float()

    # ---------------------------------------------------------------- KVShift
    @torch.inference_mode()
    def shift(self, n_keep: int, n_discard: int) -> str | None:
        """Remove cached positions [n_keep, n_keep + n_discard) and re-rotate the later keys to their new
        positions, each layer with its own RoPE (``rope.py``), so nothing is re-prefilled. Returns None when done,
        or why it cannot be done exactly (the cache is then unchanged)."""
        from .rope import layer_ropes, shift_cells

        ropes = layer_ropes(self.model, self.ctx_size)
        if isinstance(ropes, str):
            return ropes
        total = self.cached_tokens()
        if n_discard <= 0 or n_keep + n_discard > total:
            return f"nothing to shift ({n_keep}+{n_discard} of {total} tokens)"
        layers = list(self.cache.layers)
        if len(layers) != len(ropes) or any(getattr(layer, "keys", None) is None for layer in layers):
            return f"the cache's {len(layers)} layers do not match the model's {len(ropes)} decoder layers"
        # Every layer holds a cell for every position (``full_length_layers``; fmc's cache is full-length too), so
        # a shift is exact on sliding-window layers as on global ones: their masks apply the window afterwards.
        for layer, rope in zip(layers, ropes):
            if self.kernel == "fmc":  # preallocated buffers: shift in place, then lower the fill
                k, v = shift_cells(layer.keys[:, :, :total], layer.values[:, :, :total], 0, n_keep, n_discard, rope)
                layer.keys[:, :, : k.shape[2]] = k
                layer.values[:, :, : v.shape[2]] = v
            else:
                k, v = shift_cells(layer.keys, layer.values, 0, n_keep, n_discard, rope)
                layer.keys, layer.values = k.contiguous(), v.contiguous()
        if self.kernel == "fmc":
            self.cache.crop_to(total - n_discard)
        return None

    # ---------------------------------------------------------------- KVSnapshot
    def kv_fingerprint(self) -> dict:
        import transformers

        weights = Path(self.load_report.weights_dir)
        files = []
        if weights.is_dir():
            for f in sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin")):
                st = f.stat()
                files.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return {
            "model": self.model_name,
            "weights_dir": str(weights.resolve()) if weights.exists() else str(weights),
            "weights_files": hashlib.sha256("|".join(files).encode()).hexdigest()[:16],
            "dtype": self.dtype,
            "quant": self.quant,
            "kernel": self.kernel,
            "device": self.device,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    def kv_layers(self) -> int:
        return len(self.cache.layers)

    def export_kv(self, start: int, end: int) -> list[tuple]:
        out = []
        for layer in self.cache.layers:
            k, v = layer.keys, layer.values
            out.append((k[:, :, start:end].detach().to("cpu").contiguous(), v[:, :, start:end].detach().to("cpu").contiguous()))
        return out

    def import_kv(self, layers: list[tuple]) -> None:
        if len(layers) != len(self.cache.layers):
            raise ValueError(f"{len(layers)} layers for a cache of {len(self.cache.layers)}")
        dev = self._dev
        for i, (k, v) in enumerate(layers):
            self.cache.update(k.to(dev).contiguous(), v.to(dev).contiguous(), i)

    # ---------------------------------------------------------------- costs
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

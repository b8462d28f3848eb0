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

from fmchat import models, paths, registry, templates
from fmchat.errors import UserError

from ..base import AllLogits, BackgroundDecode, KVShift, KVSnapshot, LoadReport, ProgressFn, TokenBackend, no_progress
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


class TransformersBackend(TokenBackend, KVShift, KVSnapshot, AllLogits, BackgroundDecode):
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
        self._weights_dir = Path(weights)
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
        # decode step: "off", "compiled (...)", "eager: <why not compiled>", or (auto) "auto: <what runs meanwhile>"
        self.compile_status = "off"
        self._decode_choice, self._eager_reason = self._plan_decode(options.compile)
        if self._decode_choice != "eager" and self.kernel != "fmc":
            self.kernel = "fmc"  # the compiled step needs the preallocated cache (fixed shapes)
        if self.kernel == "fmc":
            from .fmc import register

            register()
        from .loading import load_weights  # within a memory budget: see loading.py

        loaded = load_weights(weights, quant=self.quant, integer="integer" in quant_caps, dtype=self._dtype,
                              kernel=self.kernel, device=self._dev, progress=progress)  # fmt: skip
        self.model = loaded.model
        self.quant_report = loaded.quant_report  # what quantize_model did (kernels/quant), when a scheme was applied
        self.weights_load = loaded.how  # "mapped", "streamed", "stored" or "full (why)"
        self._cache_cls = DynamicCache

        self.model_name = source.name
        self.device = self._dev
        self.dtype = self._dtype_name()
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        self.ctx_size = min(options.ctx, max_pos) if options.ctx else min(DEFAULT_CTX_CAP, max_pos)
        self.cache = self._new_cache()  # after ctx_size: the fmc cache is preallocated to it
        self.eos_token_ids = frozenset(self._eos_ids() | templates.stop_ids(self.template, vocab.get))
        self._weights_bytes = self._count_weights_bytes()
        if self._dev == "cpu":  # before any compile: the compiled step reads the choices, and its cache key names them
            self._select_kernels(progress)
            from .compiled import use_decode_linears

            use_decode_linears(self.model)  # the measured bf16 prefill path, eagerly too (compiled.DecodeLinear)
        self._step = None
        self._last_forward = time.monotonic()  # the load counts as activity: a chat starting now goes first
        self._forwards = 0  # forwards under way (a long prefill is activity from its start to its end)
        self._build = None  # the StepBuild of the compiled step (compiled.py), while one is wanted
        if self._decode_choice == "auto":
            self._start_background_compile(progress)
        elif self._decode_choice != "eager":
            self._compile_step(self._decode_choice, progress)
        elif self._eager_reason and "FMCHAT_AUTO_COMPILE" not in self._eager_reason:
            self.compile_status = f"eager ({self._eager_reason})"  # (switched off by the variable: plain "eager")
        self.load_report = LoadReport(time.perf_counter() - t0, converted, str(weights), loaded.how == "stored")
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

    def _select_kernels(self, progress: ProgressFn) -> None:
        """Pick the weight-product kernels (one row, prefill) for this model's weight formats by measuring them on
        this machine, once per torch version, CPU capability, threads and model size; cached (kernels/quant/select.py,
        docs/quant.md)."""
        from fmchat_kernels.quant import native, select

        from .compiled import INDUCTOR_OPTIONS

        if self.device == "cpu" and any(getattr(m, "scheme", None) == "int8" for m in self.model.modules()):
            native.load(paths.cache_dir() / "native", log=lambda m: progress(m, None))  # built once per machine
        from . import compile_cache as cc

        with cc.inductor_dir():  # the probes it compiles: inductor's cache of this CPU capability, as the step's
            select.ensure_for_model(self.model, paths.cache_dir() / "kernel_choices.json",
                                    compiled=self._decode_choice != "eager", compile_options=INDUCTOR_OPTIONS,
                                    log=lambda m: progress(m, None))  # fmt: skip

    # ---------------------------------------------------------------- the decode path (compiled.py, compile_cache.py)
    def _plan_decode(self, value: str) -> tuple[str, str]:
        """(the decode path to prepare, why eager when it is eager by circumstance). ``auto`` becomes eager where
        the compiled step cannot run: on CUDA (docs/decode.md), or when FMCHAT_AUTO_COMPILE=0 (the test suite's
        default, so that each small model a test loads does not start a compile)."""
        import os

        from .compiled import decode_choice

        choice = decode_choice(value)
        if choice != "auto":
            return choice, ""
        if self._dev != "cpu":
            return "eager", "auto: the compiled step is CPU-only for now"
        if os.environ.get("FMCHAT_AUTO_COMPILE", "1") == "0":
            return "eager", "auto: background compile off (FMCHAT_AUTO_COMPILE=0)"
        return "auto", ""

    def _cache_entry(self, backend: str, aot: bool = False):
        """The on-disk cache entry of this backend's compiled step (None for torch.compile backends that leave no
        artifact to keep); ``aot``: the entry of its AOTInductor package."""
        if backend != "inductor":
            return None
        from . import compile_cache
        from .compiled import AOT_OPTIONS, INDUCTOR_OPTIONS

        weights = Path(self._weights_dir)
        model = {"name": self.model_name, **compile_cache.weights_fingerprint(weights)}
        load = {"quant": self.quant, "dtype": self.dtype, "kernel": self.kernel, "ctx": self.ctx_size, "device": self._dev}
        from fmchat_kernels.quant import select

        formats = select.model_formats_and_shapes(self.model)[0]
        options = {"backend": "aot_inductor", "inductor": AOT_OPTIONS} if aot else {"backend": backend, "inductor": INDUCTOR_OPTIONS}
        key = compile_cache.step_key(model, load, options, formats)
        return compile_cache.Entry(key, artifact=compile_cache.AOT_PACKAGE if aot else compile_cache.ARTIFACTS)

    def _new_build(self, choice: str, scratch: bool, progress=None, entries: dict | None = None):
        """A StepBuild for ``choice``; ``entries`` ({False: torch.compile's entry, True: the AOT package's}) when the
        caller has them already (building the keys reads the weights files' stats and hashes the step's code)."""
        import os

        from .compiled import AotStep, CompiledStep, StepBuild

        backend = "inductor" if choice in ("auto", "compiled") else choice

        def make():
            # the background compile works on a scratch cache of the same shapes (the chat keeps its own meanwhile)
            cache = self._new_cache() if scratch else self.cache
            return CompiledStep(self.model, cache, self._dev, choice)

        def make_aot():
            return AotStep(self.model, self._new_cache() if scratch else self.cache, self._dev)

        if entries is None:
            entries = {}
            for aot in (False, True):
                try:
                    entries[aot] = self._cache_entry(backend, aot)
                except Exception:  # noqa: BLE001 - no cache key (e.g. unreadable weights dir): compile without caching
                    entries[aot] = None
        # FMCHAT_AOT=0: torch.compile only (the path before AOTInductor; for A/B measurements)
        use_aot = backend == "inductor" and os.environ.get("FMCHAT_AOT", "1") != "0"
        return StepBuild(make, entries[False], progress, make_aot=make_aot if use_aot else None, aot_entry=entries[True])

    def _idle(self) -> bool:
        """No forward for a second (a reply finished, or none has started since the load): the background compile
        may take the CPU (``StepBuild.idle``)."""
        return self._forwards == 0 and time.monotonic() - self._last_forward >= 1.0

    def _start_background_compile(self, progress: ProgressFn = no_progress) -> None:
        """``auto``: a step this machine compiled before (an AOTInductor package) is loaded now, in well under a
        second, and decodes from the first reply; otherwise it is prepared in the background."""
        build = self._new_build("auto", scratch=False)
        if build.aot_entry is not None and build.aot_entry.exists():
            progress("loading the compiled decode step", None)
            step = build.load_saved()
            if step is not None:
                self._build, self._step = build, step
                self.compile_status = self._compiled_status(build)
                return
        self._build = self._new_build("auto", scratch=True, entries={False: build.entry, True: build.aot_entry})
        self._build.idle = self._idle
        self.compile_status = "auto: eager until the compiled step is ready"
        self._build.start()

    def _compile_step(self, choice: str, progress: ProgressFn) -> None:
        """Compile the one-token decode step now (at load; from the cache when this machine compiled it before); on
        any failure stay eager and say why."""
        progress("compiling decode step (once per machine, model and options; cached)", None)
        build = self._new_build(choice, scratch=False, progress=progress)
        step = build.run()
        self.cache.crop_to(0)
        if step is None:
            self.compile_status = f"eager: compile failed ({build.error})"
            progress(f"compile failed, decoding eagerly: {(build.error or '').split(':')[0]}", None)
            return
        self._build = build
        self._step = step
        self.compile_status = self._compiled_status(build)

    @staticmethod
    def _compiled_status(build) -> str:
        how = "cached, " if build.cached else ""
        return f"compiled ({build.step.backend}, {how}{build.seconds:.1f} s)"

    def _maybe_switch(self) -> None:
        """Between turns only (called at a prefill or on an empty cache): take the background-compiled step once it
        is ready, bound to this chat's cache; or record why it failed."""
        build = self._build
        if build is None or self._step is not None or not build.done.is_set():
            return
        if build.step is None:
            self.compile_status = f"eager: compile failed ({build.error})"
            self._build = None
            return
        try:
            build.step.bind(self.cache)
        except Exception as exc:  # noqa: BLE001 - cannot happen with fmc's fixed buffers; stay eager if it does
            self.compile_status = f"eager: compiled step not usable ({exc})"
            self._build = None
            return
        self._step = build.step
        self.compile_status = self._compiled_status(build)

    def wait_decode_step(self, timeout: float | None = None, progress: ProgressFn | None = None) -> bool:
        """Block until the background compile (``--compile auto``) has finished, reporting ``progress`` every few
        seconds; the compiled step is then used from the next turn (the first one, when nothing is cached yet).
        True when a compiled step is ready. ``fmchat run`` calls this: before its reply when the step is cached
        (loading it is quicker than an eager reply), after it otherwise (so that the next launch finds it cached)."""
        build = self._build
        if build is None:
            return self._step is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        said, said_at = None, 0.0
        while not build.done.wait(0.25 if progress or deadline is not None else None):
            if progress is not None and (build.phase != said or time.monotonic() - said_at >= 2.0):
                said, said_at = build.phase, time.monotonic()  # each new phase at once, then every 2 s
                progress(f"decode step: {build.phase} ({build.elapsed():.0f} s)", build.fraction())
            if deadline is not None and time.monotonic() > deadline:
                return False
        if self.cached_tokens() == 0:
            self._maybe_switch()
        return build.step is not None

    def watch_decode(self, fn) -> None:
        """Call ``fn()`` (no arguments, on the compile thread: hand it to the UI thread) whenever the background
        compile changes phase or finishes; then read ``decode_status()``. Does nothing when no compile is under way."""
        if self._build is not None and not self._build.done.is_set():
            self._build.listeners.append(fn)

    def decode_status(self) -> dict:
        """What the panel shows about the decode path, as plain values: ``path`` ("eager" / "compiled"), ``choice``
        (the setting: auto, eager, compiled), ``state`` ("eager", "compiling", "ready" = compiled, waiting for the
        next turn, "compiled", "failed", "unavailable"), ``phase`` (what the compile does now), ``elapsed_s``,
        ``fraction`` (an estimate from the last compile of this key here, or None), ``cached_entry`` (a compiled
        step for this key was on disk at load), ``cached`` (the step in use came from it), ``detail`` (the one-line
        status, as in ``decode_path``) and ``cache_dir``."""
        build = self._build
        choice = self._decode_choice if not self._eager_reason else "auto"
        detail = f"eager ({self._eager_reason})" if self._eager_reason else self.decode_path
        out = {"path": "compiled" if self._step is not None else "eager", "choice": choice, "detail": detail,
               "phase": None, "elapsed_s": None, "fraction": None, "cached_entry": False, "cached": False, "cache_dir": None}  # fmt: skip
        if self._step is not None:
            out["state"] = "compiled"
        elif self.compile_status.startswith("eager: compile failed"):
            out["state"] = "failed"
        elif self._eager_reason and choice == "auto":
            out["state"] = "unavailable"
        elif build is None:
            out["state"] = "eager"
        else:
            out["state"] = "ready" if build.done.is_set() and build.step is not None else "compiling"
        if build is not None:
            out.update(phase=build.phase, elapsed_s=round(build.elapsed(), 1), fraction=build.fraction(), cached=build.cached,
                       cached_entry=build.expected is not None, cache_dir=str(build.entry.dir) if build.entry else None)  # fmt: skip
        return out

    @property
    def decode_path(self) -> str:
        """How one-token steps run: "eager", "compiled (...)", "eager: <why>" or, while ``auto`` compiles in the
        background, "eager (compiled step: <phase>, <s> s)" / "eager (compiled step ready from the next turn)"."""
        if self.compile_status == "off":
            return "eager"
        build = self._build
        if self._step is None and build is not None and self.compile_status.startswith("auto:"):
            if build.done.is_set():
                if build.step is None:
                    return f"eager: compile failed ({build.error})"
                return "eager (compiled step ready from the next turn)"
            return f"eager (compiled step: {build.phase}, {build.elapsed():.0f} s)"
        return self.compile_status

    def close(self) -> None:
        """A background compile not yet begun will not begin (one under way finishes on its daemon thread: torch's
        compile cannot be interrupted; it is still saved for the next launch, then dropped)."""
        if self._build is not None and self._step is None:
            self._build.cancel()

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

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        self._forwards += 1
        try:
            return self._forward(ids)
        finally:
            self._forwards -= 1
            self._last_forward = time.monotonic()

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        past = self.cached_tokens()
        if self._build is not None and self._step is None and (len(ids) > 1 or past == 0):
            self._maybe_switch()  # a prefill starts a turn: the only place the decode path may change
        if self._step is not None and len(ids) == 1 and past > 0:
            if past + 1 > self.ctx_size:
                raise ValueError(f"fmc KV cache is full: {past} + 1 tokens > {self.ctx_size}")
            if self._step.covers(past):
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

    def kv_used_bytes(self) -> int | None:
        # Every layer keeps a cell per cached position (sliding-window layers included: full_length_layers), so the
        # bytes in use are the cached tokens times each layer's K and V bytes per position ([B, H_kv, *, D]).
        per_position = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.dim() == 4:
                    per_position += t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()
        return self.cached_tokens() * per_position

    def weights_bytes(self) -> int | None:
        return self._weights_bytes

    def accelerator_mem_mb(self) -> float | None:
        if self._dev == "cuda":
            return torch.cuda.memory_allocated() / (1024 * 1024)
        return None

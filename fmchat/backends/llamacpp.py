"""The llama.cpp backend (llama-cpp-python): the fastest path on a CPU, on the same GGUF file.

It implements the same token-level protocol as the transformers backend, so the engine's ledger logic
(prefix reuse, crop on divergence, own sampling) is shared: llama.cpp keeps the KV cache, fmchat keeps
the ledger. The KV cache is allocated by llama.cpp for the whole context window at load time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fmchat import models, templates
from fmchat.errors import UserError

from .base import KVShift, LoadReport, ProgressFn, TokenBackend, default_threads, no_progress

if TYPE_CHECKING:
    from fmchat.config import RunConfig

DEFAULT_CTX_CAP = 8192
# general.file_type values of llama.cpp's GGUF writer (the common ones)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}  # fmt: skip


class _Vocab:
    """``text in vocab``: whether ``text`` is one token of the loaded model's vocabulary."""

    def __init__(self, token_id) -> None:
        self.token_id = token_id

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.token_id(text) is not None


class LlamaCppBackend(TokenBackend, KVShift):
    name = "llamacpp"
    kernel = "llama.cpp"
    quant = "gguf"  # until loaded: then the file's own type (Q4_1, Q8_0...)

    def __init__(self, source: models.ModelSource, options: RunConfig, progress: ProgressFn = no_progress):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if source.kind != "gguf":
            raise UserError(f"the llamacpp backend needs a .gguf model; '{source.name}' is a {source.kind.replace('_', ' ')}")
        if options.device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise UserError("--device cuda: this llama-cpp-python build has no GPU offload")
        t0 = time.perf_counter()
        self._llama_cpp = llama_cpp
        gpu_layers = options.gpu_layers if options.device != "cpu" else 0
        progress(f"loading {source.path.name} with llama.cpp", None)
        # Opened with the default window cap; reopened below if the model's own window is smaller.
        self.llm = llama_cpp.Llama(
            model_path=str(source.path),
            n_ctx=options.ctx or DEFAULT_CTX_CAP,
            n_threads=options.threads or default_threads(),
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        md = self.llm.metadata
        arch = md.get("general.architecture", "llama")
        train_ctx = int(md.get(f"{arch}.context_length", self.llm.n_ctx()))
        if options.ctx is None and train_ctx < self.llm.n_ctx():
            self.llm.close()
            self.llm = llama_cpp.Llama(model_path=str(source.path), n_ctx=train_ctx,
                                       n_threads=options.threads or default_threads(), n_gpu_layers=gpu_layers, verbose=False)  # fmt: skip
        own = templates.own_template(md.get("tokenizer.chat_template"))
        self.template = templates.resolve(options.chat_template, own, md.get("general.architecture"), _Vocab(self._token_id))
        self.chat_template = self.template.describe()
        self.chat_template_own = self.template.own
        eos = self.llm.token_eos()
        tokens = {"eos_token": self._token_text(eos), "bos_token": self._token_text(self.llm.token_bos())}
        self._formatter = Jinja2ChatFormatter(self.template.source, **tokens)
        self._formatter_nogen = Jinja2ChatFormatter(self.template.source, add_generation_prompt=False, **tokens)
        self.model_name = source.name
        self.device = "cuda" if gpu_layers and llama_cpp.llama_supports_gpu_offload() else "cpu"
        self.dtype = FILE_TYPES.get(int(md.get("general.file_type", -1)), "gguf")
        self.quant = self.dtype  # the GGUF's own quantization (its file type, e.g. Q4_1): llama.cpp runs it as stored
        self.ctx_size = self.llm.n_ctx()
        self.eos_token_ids = frozenset({eos} | self._eot_ids() | templates.stop_ids(self.template, self._token_id))
        n_layer = int(md.get(f"{arch}.block_count", 0))
        n_head = int(md.get(f"{arch}.attention.head_count", 1))
        n_head_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head))
        n_embd = int(md.get(f"{arch}.embedding_length", 0))
        head_dim = int(md.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
        # f16 K and V for every layer and every position of the window, allocated at load time
        self._kv_bytes = 2 * n_layer * self.ctx_size * n_head_kv * head_dim * 2
        self._weights_bytes = int(llama_cpp.llama_model_size(self.llm.model))
        self.load_report = LoadReport(time.perf_counter() - t0, False, str(source.path))
        progress("ready", 1.0)

    def _token_text(self, token: int) -> str:
        """A token's text, special tokens included ("" for none, -1)."""
        return "" if token < 0 else self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def _token_id(self, text: str) -> int | None:
        """The id of the one token that is ``text`` (special tokens too), or None when it is not one token."""
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self._token_text(ids[0]) == text else None

    def _eot_ids(self) -> set[int]:
        vocab = self._llama_cpp.llama_model_get_vocab(self.llm.model)
        eot = self._llama_cpp.llama_vocab_eot(vocab)
        return {eot} if eot >= 0 else set()

    # ---------------------------------------------------------------- protocol
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        fmt = self._formatter if add_generation_prompt else self._formatter_nogen
        prompt = fmt(messages=list(messages)).prompt
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        special = [i for i in ids if i in self.eos_token_ids]
        ids = [i for i in ids if i not in special]
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def cached_tokens(self) -> int:
        return int(self.llm.n_tokens)

    def truncate(self, n: int) -> None:
        # llama.cpp's eval() removes KV cells past n_tokens before it decodes, so moving the mark crops.
        n = max(0, min(n, self.llm.n_tokens))
        self.llm.n_tokens = n
        self.llm._ctx.kv_cache_seq_rm(-1, n, -1)

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        self.llm.eval(list(ids))
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()
        return torch.from_numpy(logits)

    def shift(self, n_keep: int, n_discard: int) -> str | None:
        """llama.cpp's own context shift: drop cells [n_keep, n_keep + n_discard), move the rest back."""
        n = self.llm.n_tokens
        if n_discard <= 0 or n_keep + n_discard > n:
            return f"nothing to shift ({n_keep}+{n_discard} of {n} tokens)"
        ctx = self.llm._ctx
        ctx.kv_cache_seq_rm(0, n_keep, n_keep + n_discard)
        ctx.kv_cache_seq_shift(0, n_keep + n_discard, n, -n_discard)
        ids = self.llm.input_ids
        ids[n_keep : n - n_discard] = ids[n_keep + n_discard : n].copy()
        self.llm.n_tokens = n - n_discard
        return None

    def seq_lens(self) -> list[int]:
        return [self.cached_tokens()]

    def kv_bytes(self) -> int | None:
        return self._kv_bytes

    def kv_used_bytes(self) -> int | None:
        return self._kv_bytes * self.cached_tokens() // max(1, self.ctx_size)  # the cells holding cached positions

    def weights_bytes(self) -> int | None:
        return self._weights_bytes

    def accelerator_mem_mb(self) -> float | None:
        return None  # llama.cpp does not report it through this API

    def close(self) -> None:
        self.llm.close()

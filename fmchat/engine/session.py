"""ChatSession: the conversation, its token ledger, and the KV cache that survives turns.

The *ledger* is exactly the token ids held in the backend's KV cache, in order. A turn renders the whole
conversation with the chat template, keeps the longest common prefix of that rendering and the ledger
(cropping the cache where they diverge), prefills only the rest, then decodes. Generated tokens enter
the ledger as they are fed to the model, never re-tokenized from text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fmchat.backends.base import AllLogits, Backend, KVShift, KVSnapshot, TextBackend, TokenBackend, default_threads
from fmchat.context.policies import MemoryAction, NoRoom, plan_room
from fmchat.errors import FmchatError, UserError
from fmchat.tokens import common_prefix

from .detok import StreamDecoder
from .events import Event, TextDelta, TurnDone, TurnStarted, run_to_done
from .sampling import GenerationConfig, Sampler
from .stats import TurnStats, peak_rss_mb, rss_mb

PREFILL_CHUNK = 512  # tokens per prefill forward; bounds activation memory and lets cancel act between chunks


class EmptyPrompt(UserError):
    """The message is empty (or only white space)."""


class ContextOverflow(UserError):
    """The prompt alone does not fit the context window. The session is left as it was."""


class TurnInProgress(FmchatError):
    """A turn is already running on this chat."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    cancelled: bool = False
    stats: TurnStats | None = None
    token_ids: list[int] = field(default_factory=list)  # assistant: the generated ids, as sampled

    def as_template(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass
class SessionConfig:
    system: str | None = None
    kv_cache: bool = True
    ctx: int | None = None  # cap on the context window; None = the backend's
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    memory: str = "shift"  # what to do when the window is full: none | sliding | shift | summary (fmchat.memory)


class ChatSession:
    """One conversation on one backend. The turn strategy is picked once per backend: token-level backends
    run fmchat's own loop over the ledger; text-level ones stream from their server."""

    def __init__(self, backend: Backend, config: SessionConfig | None = None):
        self.config = config or SessionConfig()
        self.messages: list[Message] = []
        self._ledger: list[int] = []  # exactly the token ids in the backend's KV cache, in order
        self.window_start = 0  # messages before this index were dropped from the window by the memory policy
        self.memory_note = ""  # the summary policy's note on dropped turns, kept after the system prompt
        # The record of the turn running now, or of the last one run in this chat on this backend (None after a new
        # chat, an opened transcript, a retry or a backend switch). Filled as the turn goes (prefilled tokens, TTFT...),
        # so a panel can read it from another thread while the turn runs.
        self.current_turn: TurnStats | None = None
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self.sampler = Sampler(self.config.gen)
        self._use(backend)

    def _use(self, backend: Backend) -> None:
        if not isinstance(backend, (TokenBackend, TextBackend)):
            raise TypeError(f"{type(backend).__name__} is neither a TokenBackend nor a TextBackend")
        self.backend = backend
        self.current_turn = None
        self._turn_impl = self._turn_tokens if isinstance(backend, TokenBackend) else self._turn_text
        self._ledger.clear()
        if isinstance(backend, TokenBackend):
            backend.truncate(0)

    # ------------------------------------------------------------------ state
    @property
    def ctx_size(self) -> int:
        cap = self.config.ctx
        return min(cap, self.backend.ctx_size) if cap else self.backend.ctx_size

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "user")

    @property
    def ledger(self) -> list[int]:
        """A copy of the token ids held in the KV cache (empty on a text-level backend)."""
        return list(self._ledger)

    @property
    def token_level(self) -> bool:
        return isinstance(self.backend, TokenBackend)

    @property
    def busy(self) -> bool:
        """A turn, a restore or a prefill holds the session."""
        return self._busy.locked()

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The backend's chat template applied to ``messages`` (token-level backends)."""
        return self.backend.render(messages, add_generation_prompt=add_generation_prompt)

    def template_messages(self, extra_user: str | None = None, window_start: int | None = None) -> list[dict]:
        """What the model sees: system prompt (+ memory note), the in-window messages, the new message."""
        msgs = []
        system = self.config.system or ""
        if self.memory_note:
            system = (system + "\n\n" if system else "") + f"Notes on the earlier conversation: {self.memory_note}"
        if system:
            msgs.append({"role": "system", "content": system})
        start = self.window_start if window_start is None else window_start
        msgs += [m.as_template() for m in self.messages[start:]]
        if extra_user is not None:
            msgs.append({"role": "user", "content": extra_user})
        return msgs

    def reset(self) -> None:
        """Start a new conversation (same model and settings)."""
        with self._busy:
            self.messages.clear()
            self.current_turn = None
            self.window_start = 0
            self.memory_note = ""
            self._set_ledger(0)

    def pop_last_exchange(self) -> str | None:
        """Remove the last user message and the reply to it; returns that user text (for retry)."""
        with self._busy:
            for i in range(len(self.messages) - 1, -1, -1):
                if self.messages[i].role == "user":
                    text = self.messages[i].content
                    del self.messages[i:]
                    self.current_turn = None
                    self.window_start = min(self.window_start, len(self.messages))
                    return text
            return None

    def replace_backend(self, backend: Backend) -> None:
        """Carry the conversation over to another backend (new model, dtype, kernel...).

        The new backend's cache starts empty; the next turn rebuilds it from the transcript.
        """
        with self._busy:
            self._use(backend)
            self.sampler = Sampler(self.config.gen)

    def configure(self, **changes) -> None:
        """Settings that apply from the next turn without reloading the model: ``system``, ``kv_cache``,
        ``ctx``, ``memory``, ``gen`` (a changed ``gen`` restarts the sampler, e.g. for a new seed)."""
        unknown = set(changes) - {"system", "kv_cache", "ctx", "memory", "gen"}
        if unknown:
            raise TypeError(f"not a session setting: {', '.join(sorted(unknown))}")
        with self._busy:
            gen = changes.pop("gen", self.config.gen)
            for key, value in changes.items():
                setattr(self.config, key, value)
            if gen != self.config.gen:
                self.config.gen = gen
                self.sampler = Sampler(gen)

    def load_transcript(self, messages: list[Message], *, window_start: int = 0, memory_note: str = "",
                        system: str | None = None) -> None:  # fmt: skip
        """Replace the conversation with a saved one (the cache is emptied; ``restore_cache`` or the next
        turn brings it back)."""
        with self._busy:
            self.messages[:] = messages
            self.current_turn = None
            self.window_start = min(window_start, len(messages))
            self.memory_note = memory_note
            self.config.system = system
            self._set_ledger(0)

    def cancel(self) -> None:
        """Stop the turn in progress within one token (safe to call from any thread)."""
        self._cancel.set()

    def _set_ledger(self, n: int) -> None:
        if isinstance(self.backend, TokenBackend):
            self.backend.truncate(n)
        del self._ledger[n:]

    # ------------------------------------------------------------------ a turn
    def turn(self, user_text: str) -> Iterator[Event]:
        """Run one turn: yields TurnStarted, TextDelta..., then TurnDone.

        Raises EmptyPrompt or ContextOverflow before anything changes.
        """
        if not user_text or not user_text.strip():
            raise EmptyPrompt("empty prompt")
        if not self._busy.acquire(blocking=False):
            raise TurnInProgress("a turn is already running")
        try:
            yield from self._turn_impl(user_text)
        finally:
            self._busy.release()

    def _make_room(self, user_text: str, reserve: int) -> MemoryAction:
        """Run the context policy and apply what it decided (the session owns window, ledger and cache)."""
        action = plan_room(self, self.config.memory, user_text, reserve, kv_cache=self.config.kv_cache,
                           complete=self._complete)  # fmt: skip
        if action.shift is not None:
            keep, n = action.shift
            backend = self.backend
            reason = backend.shift(keep, n) if isinstance(backend, KVShift) else f"the {backend.name} backend cannot edit its cache"
            if reason is None:
                del self._ledger[keep : keep + n]
            else:
                action.shift_failed(reason)
        if action.memory_note is not None:
            self.memory_note = action.memory_note
        self.window_start = action.new_window_start
        action.kv_after = len(self._ledger)
        return action

    def _turn_tokens(self, user_text: str) -> Iterator[Event]:
        backend, gen = self.backend, self.config.gen
        ctx_size = self.ctx_size
        t0 = time.perf_counter()
        ids = backend.render(self.template_messages(user_text))
        memory = None
        reserve = min(gen.max_new_tokens, ctx_size // 4)  # room kept for the reply when making room
        if len(ids) + reserve > ctx_size and self.config.memory != "none" and self.window_start < len(self.messages):
            try:
                memory = self._make_room(user_text, reserve)
            except NoRoom as exc:
                raise ContextOverflow(f"{exc}; shorten the message") from None
            ids = backend.render(self.template_messages(user_text))
        if len(ids) + 1 > ctx_size:
            if self.window_start < len(self.messages):
                raise ContextOverflow(
                    f"the conversation needs {len(ids)} tokens but the context window is {ctx_size} tokens; "
                    "start a new chat (/reset) or choose a memory policy (--memory sliding|shift|summary)"
                )
            raise ContextOverflow(
                f"the prompt needs {len(ids)} tokens but the context window is {ctx_size} tokens; "
                "shorten the message or start a new chat"
            )
        self._cancel.clear()
        turn_no = self.turns + 1
        self.messages.append(Message("user", user_text))

        if not self.config.kv_cache:
            self._set_ledger(0)
        keep = common_prefix(self._ledger, ids)
        if keep == len(ids):  # everything cached: recompute the last token to get its logits
            keep -= 1
        if keep < len(self._ledger):
            self._set_ledger(keep)
        todo = ids[keep:]
        stats = TurnStats(
            turn=turn_no,
            prompt_tokens=len(ids),
            reused_tokens=keep,
            ctx_size=ctx_size,
            device=backend.device,
            dtype=backend.dtype,
            decode_path=backend.decode_path,
        )
        if memory is not None:
            memory.kv_after = len(self._ledger)  # after the crop to what the new window shares with the cache
            stats.memory_action = memory.action
            stats.memory_note = memory.describe()
            stats.evicted_tokens = memory.evicted_tokens
            stats.summarized_tokens = memory.summarized_tokens
            stats.kv_fill_before = memory.kv_before
            stats.kv_fill_after = memory.kv_after
        self.current_turn = stats
        decoder = StreamDecoder(backend.decode)
        finish = ""
        t_first = t_last = None
        try:
            yield TurnStarted(turn_no, len(ids), keep, len(todo), ctx_size)
            logits = None
            t_pf0 = time.perf_counter()
            for start in range(0, len(todo), PREFILL_CHUNK):
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                chunk = todo[start : start + PREFILL_CHUNK]
                logits = backend.forward(chunk)
                self._ledger.extend(chunk)
                stats.prefilled_tokens += len(chunk)
            t_prefill = time.perf_counter()
            stats.prefill_tok_s = stats.prefilled_tokens / max(t_prefill - t_pf0, 1e-9) if stats.prefilled_tokens else None

            while not finish:
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                token = int(self.sampler(logits))  # the one host sync per token
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.ttft_ms = (now - t0) * 1000
                t_last = now
                if token in backend.eos_token_ids:
                    finish = "stop"
                    break
                stats.generated_tokens += 1
                delta = decoder.push(token)
                if delta:
                    yield TextDelta(delta, stats.generated_tokens, len(self._ledger), now - t_first)
                if stats.generated_tokens >= gen.max_new_tokens:
                    finish = "length"
                    break
                if len(self._ledger) + 1 > ctx_size:
                    finish = "context"
                    break
                if self._cancel.is_set():
                    finish = "cancelled"
                    break
                logits = backend.forward([token])
                self._ledger.append(token)
        except GeneratorExit:
            # The caller stopped listening: the ledger is consistent at every yield, keep the partial reply.
            self._record_reply(decoder, stats, "cancelled", t0, t_first, t_last)
            raise
        except BaseException:
            # The cache may be half-updated: drop it rather than trust it; keep the transcript.
            self._set_ledger(0)
            self._record_reply(decoder, stats, "error", t0, t_first, t_last)
            raise
        finally:
            self._cancel.clear()

        tail = decoder.flush()
        if tail:
            yield TextDelta(tail, stats.generated_tokens, len(self._ledger), (t_last or t0) - (t_first or t0))
        reply = self._record_reply(decoder, stats, finish, t0, t_first, t_last)
        yield TurnDone(reply, stats)

    def _record_reply(self, decoder, stats, finish, t0, t_first, t_last) -> str:
        if t_first is not None and t_last is not None and t_last > t_first:
            # every token after the first cost one forward step
            sampled = stats.generated_tokens + (1 if finish == "stop" else 0)
            stats.decode_tok_s = (sampled - 1) / (t_last - t_first)
        stats.total_ms = (time.perf_counter() - t0) * 1000
        stats.finish_reason = finish
        stats.cancelled = finish in ("cancelled", "error")
        self._fill_memory_stats(stats)
        reply = decoder.text()
        self.messages.append(
            Message("assistant", reply, cancelled=stats.cancelled, stats=stats, token_ids=list(decoder.ids))
        )
        return reply
    def _turn_text(self, user_text: str) -> Iterator[Event]:
        """A turn on a text-level backend (an HTTP server that owns tokenizer and cache).

        Counts come from the server's usage report when it sends one; what it does not tell stays None.
        On a server error the session is put back as it was before the turn, so the user can retry.
        """
        backend = self.backend
        t0 = time.perf_counter()
        self._cancel.clear()
        turn_no = self.turns + 1
        msgs = self.template_messages(user_text)
        self.messages.append(Message("user", user_text))
        stats = TurnStats(turn=turn_no, prompt_tokens=None, reused_tokens=None, prefilled_tokens=None,
                          generated_tokens=None, ctx_used=None, ctx_size=backend.ctx_size, seq_lens=None,
                          device=backend.device, dtype=backend.dtype, decode_path=backend.decode_path)  # fmt: skip
        before, self.current_turn = self.current_turn, stats
        parts: list[str] = []
        chunks = 0
        usage = None
        finish = ""
        t_first = t_last = None
        try:
            yield TurnStarted(turn_no, None, None, None, backend.ctx_size)  # the server counts, if it tells at all
            for piece in backend.stream_chat(msgs, self.config.gen, self._cancel):
                now = time.perf_counter()
                usage = piece.usage or usage
                finish = {"stop": "stop", "length": "length"}.get(piece.finish_reason or "", finish)
                if piece.text:
                    if t_first is None:
                        t_first = now
                        stats.ttft_ms = (now - t0) * 1000
                    t_last = now
                    chunks += 1
                    parts.append(piece.text)
                    yield TextDelta(piece.text, chunks, None, now - t_first)
            if self._cancel.is_set():
                finish = "cancelled"
        except GeneratorExit:
            finish = "cancelled"
            self._record_text_reply(parts, stats, finish, t0, t_first, t_last, usage)
            raise
        except BaseException:
            del self.messages[len(self.messages) - 1 :]  # back to before the turn
            self.current_turn = before
            raise
        finally:
            self._cancel.clear()
        reply = self._record_text_reply(parts, stats, finish or "stop", t0, t_first, t_last, usage)
        yield TurnDone(reply, stats)

    def _record_text_reply(self, parts, stats, finish, t0, t_first, t_last, usage) -> str:
        if usage:
            stats.prompt_tokens = usage.get("prompt_tokens")
            stats.generated_tokens = usage.get("completion_tokens")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None and stats.prompt_tokens is not None:
                stats.reused_tokens = cached
                stats.prefilled_tokens = stats.prompt_tokens - cached
            if stats.prompt_tokens is not None and stats.generated_tokens is not None:
                stats.ctx_used = stats.prompt_tokens + stats.generated_tokens
        chunks = sum(1 for p in parts if p)
        stats.stream_chunks = chunks
        if t_first is not None and t_last is not None and t_last > t_first:
            stats.stream_chunks_s = (chunks - 1) / (t_last - t_first)
            if stats.generated_tokens:
                stats.decode_tok_s = (stats.generated_tokens - 1) / (t_last - t_first)
        stats.total_ms = (time.perf_counter() - t0) * 1000
        stats.finish_reason = finish
        stats.cancelled = finish == "cancelled"
        stats.rss_mb = round(rss_mb(), 1)
        stats.peak_rss_mb = round(peak_rss_mb(), 1)
        reply = "".join(parts)
        self.messages.append(Message("assistant", reply, cancelled=stats.cancelled, stats=stats))
        return reply

    @torch.inference_mode()
    def _complete(self, ids: list[int], max_new_tokens: int) -> str:
        """A greedy side generation on this session's backend (e.g. a summary); the ledger stays exact.

        The cache is cropped to the common prefix with ``ids``; the next turn re-prefills what it needs.
        """
        keep = min(common_prefix(self._ledger, ids), len(ids) - 1)
        self._set_ledger(keep)
        out: list[int] = []
        try:
            logits = self.backend.forward(ids[keep:])
            self._ledger.extend(ids[keep:])
            for _ in range(max_new_tokens):
                token = int(torch.argmax(logits))
                if token in self.backend.eos_token_ids or len(self._ledger) + 1 > self.ctx_size:
                    break
                out.append(token)
                logits = self.backend.forward([token])
                self._ledger.append(token)
        except BaseException:
            self._set_ledger(0)
            raise
        return self.backend.decode(out)

    def _fill_memory_stats(self, stats: TurnStats) -> None:
        b = self.backend
        stats.ctx_used = len(self._ledger) if self.token_level else None
        stats.seq_lens = b.seq_lens()
        stats.kv_bytes = b.kv_bytes()
        stats.kv_used_bytes = b.kv_used_bytes()
        stats.weights_bytes = b.weights_bytes()
        stats.rss_mb = round(rss_mb(), 1)
        stats.peak_rss_mb = round(peak_rss_mb(), 1)
        stats.gpu_mem_mb = b.accelerator_mem_mb()

    def snapshot_stats(self) -> TurnStats:
        """Current memory/context figures outside a turn (for panels and /stats)."""
        s = TurnStats(turn=self.turns, ctx_size=self.ctx_size, device=self.backend.device, dtype=self.backend.dtype)
        self._fill_memory_stats(s)
        return s

    def prefill_transcript(self, progress=None) -> int:
        """Bring the KV cache up to the whole transcript (a resumed chat), so the next turn prefills only its
        new message. ``progress(done, total)`` after each chunk; cancel() stops between chunks (the ledger
        stays exact). Returns the tokens prefilled; 0 when the backend keeps its own cache or the
        transcript does not fit the window (the next turn's memory policy deals with it).
        """
        if not self.token_level:
            return 0
        with self._busy:
            msgs = self.template_messages()
            ids = self.backend.render(msgs, add_generation_prompt=False) if msgs else []
            if not self.config.kv_cache or len(ids) + 1 > self.ctx_size:
                return 0
            keep = common_prefix(self._ledger, ids)
            self._set_ledger(keep)
            done = 0
            self._cancel.clear()
            try:
                with torch.inference_mode():
                    for start in range(keep, len(ids), PREFILL_CHUNK):
                        if self._cancel.is_set():
                            break
                        chunk = ids[start : start + PREFILL_CHUNK]
                        self.backend.forward(chunk)
                        self._ledger.extend(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(len(self._ledger), len(ids))
            except BaseException:
                self._set_ledger(0)
                raise
            finally:
                self._cancel.clear()
            return done

    # ------------------------------------------------------------------ KV snapshots (saved sessions)
    def kv_snapshot(self, saved=None) -> tuple[list[int], int, list[tuple]] | None:
        """The ledger, and CPU copies of the keys and values of its positions from ``start`` on, where
        ``start = saved(ledger)`` says how much of this ledger a snapshot already holds (default 0: all of it).
        None when the backend cannot export its cache (or it is empty / out of step with the ledger)."""
        backend = self.backend
        if not isinstance(backend, KVSnapshot):
            return None
        with self._busy:
            n = len(self._ledger)
            if n == 0 or backend.cached_tokens() != n:
                return None
            ledger = list(self._ledger)
            start = min(saved(ledger), n) if saved is not None else 0
            return ledger, start, backend.export_kv(start, n)

    def restore_cache(self, ledger: list[int], load_layers) -> tuple[int, str]:
        """Fill the cache from a snapshot of ``ledger``: only the prefix that the transcript, rendered now,
        agrees with. ``load_layers(keep)`` returns every layer's (keys, values) for the first ``keep`` positions.
        Returns (tokens restored, "ok" or why not); on any mismatch the cache is left empty."""
        backend = self.backend
        if not isinstance(backend, KVSnapshot):
            return 0, f"the {backend.name} backend keeps its own cache"
        with self._busy:
            msgs = self.template_messages()
            rendered = self.render(msgs, add_generation_prompt=False) if msgs else []
            keep = common_prefix(ledger, rendered)
            if keep == 0:
                return 0, "snapshot does not match the transcript"
            if keep + 1 > self.ctx_size:
                return 0, "snapshot does not fit the context window"
            layers = load_layers(keep)
            self._set_ledger(0)
            try:
                backend.import_kv(layers)
                if backend.cached_tokens() != keep:
                    raise ValueError("cache length after restore differs")
            except Exception as exc:  # noqa: BLE001  a cache that refuses the tensors: rebuilt by prefill instead
                self._set_ledger(0)
                return 0, f"snapshot did not fit this cache ({type(exc).__name__}: {exc})"
            self._ledger[:] = ledger[:keep]
            return keep, "ok"

    @torch.inference_mode()
    def message_nll(self, text: str) -> float | None:
        """Mean negative log-likelihood (nats/token) of ``text`` sent as the next user message, given the chat
        as it stands (the context policy makes room first). None when the backend has no per-position logits."""
        backend = self.backend
        if not isinstance(backend, AllLogits):
            return None
        with self._busy:
            ids = self.render(self.template_messages(text))
            if len(ids) > self.ctx_size:
                try:
                    self._make_room(text, 0)
                except NoRoom:
                    return None
                ids = self.render(self.template_messages(text))
            start = len(self.render(self.template_messages(), add_generation_prompt=False))
            keep = min(common_prefix(self._ledger, ids), start - 1)
            self._set_ledger(keep)
            try:
                logits = backend.forward_all(ids[keep:])
                self._ledger.extend(ids[keep:])
            except BaseException:
                self._set_ledger(0)
                raise
            targets = torch.tensor(ids[start:], device=logits.device)
            logp = torch.log_softmax(logits[start - 1 - keep : len(ids) - 1 - keep], dim=-1)
            return float(-logp.gather(1, targets[:, None]).mean())

    def run_turn(self, user_text: str) -> TurnDone:
        """Run a turn to completion and return its TurnDone (for scripts and tests)."""
        return run_to_done(self.turn(user_text))


def set_threads(n: int | None) -> None:
    """PyTorch CPU threads: ``n``, or one per physical core (``default_threads``) when None."""
    torch.set_num_threads(n or default_threads())

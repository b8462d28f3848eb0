"""Any OpenAI-compatible chat server (llama-server, llama_cpp.server, Ollama, vLLM, SGLang, a gateway...).

The server owns tokenizer, weights and KV cache, so this is a *text-level* backend: it streams a
chat completion over SSE. TTFT and decode rate are measured from the stream; token counts come from
the server's ``usage`` when it sends one. What the server does not tell (KV fill, weights bytes,
tokens reused) is reported as unavailable, never guessed.

The API key comes from $FMCHAT_API_KEY or $OPENAI_API_KEY and is never written anywhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import httpx

from fmchat.errors import BackendError, UserError

from .base import LoadReport, ProgressFn, StreamPiece, TextBackend, no_progress

if TYPE_CHECKING:
    from fmchat.config import RunConfig

RETRY_STATUS = {429, 500, 502, 503, 504}
RETRIES = 3


def api_key() -> str | None:
    return os.environ.get("FMCHAT_API_KEY") or os.environ.get("OPENAI_API_KEY")


class OpenAIBackend(TextBackend):
    name = "openai"
    kernel = "server"
    quant = "server"
    dtype = "server"
    chat_template = "the server's"

    def __init__(self, options: RunConfig, progress: ProgressFn = no_progress, timeout: float = 60.0, retries: int = RETRIES,
                 backoff: float = 0.5):  # fmt: skip
        t0 = time.perf_counter()
        base_url, api_model = options.base_url, options.api_model
        if not base_url:
            raise UserError("the openai backend needs a server URL: it needs --base-url, e.g. http://127.0.0.1:8080/v1")
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"--base-url '{base_url}' must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        headers = {"Accept": "text/event-stream"}
        key = api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)))  # fmt: skip
        progress(f"connecting to {self.base_url}", None)
        served = self._list_models()
        if api_model is None:
            if not served:
                raise BackendError(f"{self.base_url}: the server lists no models; pass --api-model NAME")
            api_model = served[0]
        elif served and api_model not in served:
            raise BackendError(f"model '{api_model}' is not served by {self.base_url} (it serves: {', '.join(served[:8])})")
        self.api_model = api_model
        self.model_name = api_model
        self.device = self.base_url
        self.ctx_size = options.ctx  # unknown unless the user says
        self.eos_token_ids = frozenset()
        if options.chat_template:  # the server renders the chat: say that the flag changes nothing here
            self.chat_template = "the server's (--chat-template applies to the transformers and llamacpp backends)"
            self.chat_template_own = False
        self.load_report = LoadReport(time.perf_counter() - t0, False, self.base_url)
        progress("ready", 1.0)

    # ---------------------------------------------------------------- HTTP
    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, httpx.ConnectError):
            return f"cannot connect to {self.base_url} ({exc or 'connection refused'}); is the server running?"
        if isinstance(exc, httpx.TimeoutException):
            return f"{self.base_url} did not answer in time ({type(exc).__name__})"
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"{self.base_url} closed the connection mid-reply ({exc})"
        return f"{self.base_url}: {type(exc).__name__}: {exc}"

    def _status_error(self, status: int, body: str) -> BackendError:
        detail = body.strip().replace("\n", " ")[:200]
        if status == 401:
            return BackendError(f"{self.base_url} rejected the API key (401); set FMCHAT_API_KEY or OPENAI_API_KEY")
        if status == 403:
            return BackendError(f"{self.base_url} refused access (403): {detail}")
        if status == 404:
            return BackendError(f"not found on {self.base_url} (404): unknown model or wrong --base-url (it should end in /v1): {detail}")
        return BackendError(f"{self.base_url} answered HTTP {status}: {detail}")

    def _list_models(self) -> list[str]:
        try:
            r = self._request("GET", "/models")
        except BackendError as exc:
            if "(404)" in str(exc):
                return []  # some servers have no /models; the chat request will tell
            raise
        try:
            return [m["id"] for m in r.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError):
            return []

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                r = self._client.request(method, path, **kw)
            except httpx.HTTPError as exc:
                raise BackendError(self._describe(exc)) from None
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                self._sleep_before_retry(r, attempt)
                continue
            if r.status_code >= 400:
                raise self._status_error(r.status_code, r.text)
            return r
        raise AssertionError("unreachable")

    def _sleep_before_retry(self, r: httpx.Response, attempt: int) -> None:
        wait = self.backoff * (2**attempt)
        try:
            wait = max(wait, min(float(r.headers.get("retry-after", 0)), 30.0))
        except ValueError:
            pass
        time.sleep(wait)

    # ---------------------------------------------------------------- chat
    def stream_chat(self, messages: Sequence[dict], gen, cancel: threading.Event) -> Iterator[StreamPiece]:
        body = {
            "model": self.api_model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        if gen.seed is not None:
            body["seed"] = gen.seed
        for attempt in range(self.retries + 1):
            try:
                with self._client.stream("POST", "/chat/completions", json=body) as r:
                    if r.status_code in RETRY_STATUS and attempt < self.retries:
                        r.read()
                        self._sleep_before_retry(r, attempt)
                        continue
                    if r.status_code >= 400:
                        raise self._status_error(r.status_code, r.read().decode("utf-8", "replace"))
                    yield from self._parse_sse(r, cancel)
                    return
            except httpx.HTTPError as exc:
                raise BackendError(self._describe(exc)) from None

    def _parse_sse(self, r: httpx.Response, cancel: threading.Event) -> Iterator[StreamPiece]:
        done = False
        for line in r.iter_lines():
            if cancel.is_set():
                return
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                if line.startswith(("event:", "id:", "retry:")):
                    continue
                raise BackendError(f"malformed stream from {self.base_url}: expected 'data:' lines, got {line[:80]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise BackendError(f"malformed stream from {self.base_url}: not JSON: {data[:80]!r}") from None
            if not isinstance(chunk, dict):
                raise BackendError(f"malformed stream from {self.base_url}: unexpected chunk {data[:80]!r}")
            if "error" in chunk:
                raise BackendError(f"{self.base_url} reported an error mid-stream: {str(chunk['error'])[:200]}")
            piece = StreamPiece(usage=chunk.get("usage") or None)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece.text += delta.get("content") or ""
                piece.finish_reason = choice.get("finish_reason") or piece.finish_reason
            yield piece
        if not done and not cancel.is_set():
            raise BackendError(f"{self.base_url} ended the stream without [DONE]; the reply may be incomplete")

    # ---------------------------------------------------------------- what this backend can tell
    # (KV fill, KV bytes, weights bytes, accelerator memory: the server does not say; Backend's None applies)
    def close(self) -> None:
        self._client.close()

"""llama.cpp and OpenAI-compatible backends: real llama.cpp, a real llama_cpp.server on loopback, and
small real HTTP servers on loopback that misbehave on purpose."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from typer.testing import CliRunner

from fmchat.backends.openai import BackendError
from fmchat.cli import app
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig, TextDelta

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf, port, api_key: str | None = None):
    """A real llama_cpp.server on loopback (requiring ``api_key`` when one is given), once it answers."""
    key_args = ["--api_key", api_key] if api_key else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048", "--model_alias", "smollm2", *key_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "llama_cpp.server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("llama_cpp.server did not come up")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(default_gguf):
    port = free_port()
    proc = start_llama_server(default_gguf, port)
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


def json_rows(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- llama.cpp
def llamacpp_kv_buffer_bytes(gguf, n_ctx: int) -> float:
    """The KV cache size llama.cpp reports in its own log when it opens ``gguf`` with an ``n_ctx`` window
    ("llama_kv_cache: size = 22.50 MiB (1024 cells, 30 layers, ...)"), in bytes (to its 0.01 MiB)."""
    import contextlib
    import io
    import re

    import llama_cpp

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # llama-cpp-python's log callback prints to sys.stderr when verbose
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=1, verbose=True)
        llm.close()
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # quiet again, as fmchat opens it
    m = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells", err.getvalue())
    assert m is not None, err.getvalue()[-2000:]
    assert int(m.group(2)) == n_ctx
    return float(m.group(1)) * 2**20


def test_llamacpp_reuses_the_kv_prefix_and_reports_its_costs(default_gguf):
    r = runner.invoke(app, ["run", "Hello!", "Name a colour.", "--backend", "llamacpp", "--temperature", "0",
                            "--max-new-tokens", "12", "--ctx", "1024", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    one, two = json_rows(r.stdout)
    assert one["device"] == "cpu" and one["dtype"] == "Q4_1" and one["ctx_size"] == 1024
    assert two["reused_tokens"] > one["prompt_tokens"] - 2 and two["prefilled_tokens"] == two["prompt_tokens"] - two["reused_tokens"]
    assert two["seq_lens"] == [two["ctx_used"]]
    # allocated for the whole window: what llama.cpp itself says it allocated for the same file and window
    assert abs(two["kv_bytes"] - llamacpp_kv_buffer_bytes(default_gguf, 1024)) <= 0.005 * 2**20
    assert 60e6 < two["weights_bytes"] < default_gguf.stat().st_size
    assert two["decode_tok_s"] > 0 and two["ttft_ms"] > 0


def test_llamacpp_cancel_and_switch_from_transformers_keep_the_conversation(default_gguf):
    tf = load_backend(RunConfig(backend="transformers", dtype="float32"))
    s = ChatSession(tf, SessionConfig(gen=GenerationConfig(max_new_tokens=16, temperature=0)))
    s.run_turn("What is the capital of France?")
    lc = load_backend(RunConfig(backend="llamacpp", ctx=1024))
    s.replace_backend(lc)
    d = s.run_turn("And of Italy?")
    assert d.stats.reused_tokens == 0 and d.stats.prompt_tokens > 40  # history re-prefilled on llama.cpp
    assert lc.cached_tokens() == len(s.ledger)
    s.config.gen = GenerationConfig(max_new_tokens=400, temperature=0)
    for ev in s.turn("Write a long story about a dragon."):
        if isinstance(ev, TextDelta) and ev.generated >= 3:
            s.cancel()
    last = s.messages[-1]
    assert last.cancelled and last.stats.generated_tokens <= 5
    # The turn after the cancel is about the cache (the cancelled reply's tokens stay reusable), not the reply's
    # length: 16 new tokens, as the first turns (at 400 it ran to the limit, most of this test's time).
    s.config.gen = GenerationConfig(max_new_tokens=16, temperature=0)
    d = s.run_turn("Thanks.")
    assert d.stats.reused_tokens > 0 and lc.cached_tokens() == len(s.ledger)


def test_llamacpp_needs_a_gguf(tiny_model):
    r = runner.invoke(app, ["run", "hi", "--backend", "llamacpp", "--model", str(tiny_model)])
    assert r.exit_code == 2 and "needs a .gguf model" in r.stderr


# ---------------------------------------------------------------- OpenAI-compatible, real llama_cpp.server
def test_openai_backend_streams_from_a_real_server(server):
    r = runner.invoke(app, ["run", "What is the capital of France?", "Thanks!", "--backend", "openai", "--base-url", server,
                            "--temperature", "0", "--max-new-tokens", "16", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json_rows(r.stdout)
    assert len(rows) == 2 and all(row["reply"] for row in rows)
    for row in rows:
        assert row["stream_chunks"] > 0 and row["ttft_ms"] > 0
        # what the server does not say is unavailable, not zero
        assert row["kv_bytes"] is None and row["weights_bytes"] is None and row["seq_lens"] is None
        if row["prompt_tokens"] is None:
            assert row["decode_tok_s"] is None
    assert rows[0]["device"] == server


def test_openai_errors_are_one_line(server):
    cases = [
        (["--base-url", server, "--api-model", "no-such-model"], "is not served by"),
        (["--base-url", f"http://127.0.0.1:{free_port()}/v1"], "cannot connect to"),
        (["--base-url", "ftp://example"], "must start with http"),
        ([], "needs --base-url"),
    ]
    for extra, message in cases:
        r = runner.invoke(app, ["run", "hi", "--backend", "openai", *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert message in r.stderr and "Traceback" not in r.output


def test_server_killed_mid_stream_leaves_the_session_intact(default_gguf):
    port = free_port()
    proc = start_llama_server(default_gguf, port)
    try:
        b = load_backend(RunConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1"))
        s = ChatSession(b, SessionConfig(gen=GenerationConfig(max_new_tokens=12, temperature=0)))
        s.run_turn("Hello!")
        before = [(m.role, m.content) for m in s.messages]
        s.configure(gen=GenerationConfig(max_new_tokens=500, temperature=0))
        with pytest.raises(BackendError, match="closed the connection|ended the stream|cannot connect"):
            for ev in s.turn("Tell me a very long story."):
                if isinstance(ev, TextDelta):
                    stop(proc)
        assert [(m.role, m.content) for m in s.messages] == before
    finally:
        stop(proc)


# ---------------------------------------------------------------- misbehaving servers on loopback
class Script:
    """What the toy server answers, in order, to POST /chat/completions."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.headers: list[dict] = []
        self.bodies: list[bytes] = []


def toy_server(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"data": [{"id": "toy"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            script.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            script.headers.append(dict(self.headers))
            status, body = script.answers.pop(0) if script.answers else (500, b"no more answers")
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def sse(*texts, usage=None, done=True) -> bytes:
    out = b""
    for t in texts:
        out += b"data: " + json.dumps({"choices": [{"delta": {"content": t}, "finish_reason": None}]}).encode() + b"\n\n"
    if usage:
        out += b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return out


def toy_session(url, **kw):
    b = load_backend(RunConfig(backend="openai", base_url=url))
    b.backoff = 0.01
    return ChatSession(b, SessionConfig(gen=GenerationConfig(max_new_tokens=8, temperature=0), **kw))


def test_retries_on_429_and_5xx_then_counts_from_usage(monkeypatch):
    monkeypatch.setenv("FMCHAT_API_KEY", "sk-test-secret")
    script = Script((429, b"{}"), (503, b"{}"), (200, sse("Hel", "lo", usage={"prompt_tokens": 11, "completion_tokens": 3})))
    srv, url = toy_server(script)
    try:
        s = toy_session(url)
        d = s.run_turn("hi")
        assert d.reply == "Hello"
        assert d.stats.prompt_tokens == 11 and d.stats.generated_tokens == 3 and d.stats.ctx_used == 14
        assert d.stats.stream_chunks == 2 and d.stats.reused_tokens is None
        assert len(script.headers) == 3 and script.headers[-1]["Authorization"] == "Bearer sk-test-secret"
        assert "sk-test-secret" not in json.dumps([m.stats.to_dict() for m in s.messages if m.stats])
    finally:
        srv.shutdown()


@pytest.mark.parametrize(
    "answer, message",
    [
        ((401, b'{"error": "bad key"}'), "rejected the API key"),
        ((404, b'{"error": "model not found"}'), "(404)"),
        ((200, b"this is not SSE\n\n"), "malformed stream"),
        ((200, b"data: {not json}\n\n"), "not JSON"),
        ((200, sse("partial", done=False)), "without [DONE]"),
        ((400, b'{"error": "context length exceeded"}'), "HTTP 400"),
    ],
)
def test_server_errors_are_clear_and_the_session_can_retry(answer, message):
    srv, url = toy_server(Script(answer, (200, sse("ok"))))
    try:
        s = toy_session(url)
        with pytest.raises(BackendError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            list(s.turn("hi"))
        assert s.messages == []  # intact: the failed turn left nothing behind
        assert s.run_turn("hi").reply == "ok"  # and a retry works
    finally:
        srv.shutdown()


def test_bench_backends_runs_both_local_backends(tmp_path):
    """Both local backends over a scripted conversation; the transformers row on the fast path (compiled + int8)."""
    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"turns": ["Hello!", "What is 12 times 7?"]}))
    args = ["bench", "backends", "--script", str(script), "--max-new-tokens", "8", "--compile", "on", "--quant", "int8", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.splitlines()[-1])
    assert set(result["backends"]) == {"transformers", "llamacpp"}
    tf = result["backends"]["transformers"]
    assert tf["quant"] == "int8" and tf["decode_path"].startswith("compiled (inductor"), tf["decode_path"]
    assert result["backends"]["llamacpp"]["quant"] == "Q4_1"  # the GGUF's own quantization
    for v in result["backends"].values():
        assert len(v["turns"]) == 2 and v["ttft_ms_median"] > 0
    assert result["backends"]["llamacpp"]["turns"][1]["prefilled_tokens"] < result["backends"]["llamacpp"]["turns"][1]["prompt_tokens"]


def test_llamacpp_greedy_reply_is_what_llama_cpp_itself_answers(default_gguf):
    """fmchat's own loop on llama.cpp gives the reply llama-cpp-python's chat completion gives (greedy)."""
    import llama_cpp

    question = "What is the capital of France?"
    b = load_backend(RunConfig(backend="llamacpp", ctx=512, threads=1))
    s = ChatSession(b, SessionConfig(gen=GenerationConfig(max_new_tokens=24, temperature=0)))
    ours = s.run_turn(question).reply
    b.close()
    llm = llama_cpp.Llama(model_path=str(default_gguf), n_ctx=512, n_threads=1, verbose=False)
    theirs = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0, top_k=1, max_tokens=24)
    llm.close()
    assert ours == theirs["choices"][0]["message"]["content"]

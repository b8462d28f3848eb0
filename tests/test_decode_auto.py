"""``--compile auto`` (the default decode path): the compiled step prepared in the background while the chat decodes
eagerly, switched in between turns; compiled once per machine (the on-disk cache, ``compile_cache.py``), loaded by
the next launch, rebuilt when the saved entry is corrupt; and the same greedy float32 tokens as eager throughout.
On the default model over the shared 20-turn conversation, through ``fmchat run``: tests/test_e2e.py (``--compile
on``, then the default path's second launch from the saved step, both equal to eager).

The suite runs with FMCHAT_AUTO_COMPILE=0 by default (so that the many small models other tests load do not each
start a compile); these tests switch it back on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fmchat.backends.transformers.compile_cache import AOT_PACKAGE
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig

TURNS = ["Hello there.", "Tell me about the sea.", "And the mountains?", "Thanks, one more word."]


@pytest.fixture
def compile_home(tmp_path, monkeypatch):
    """A fresh fmchat cache dir (no compiled step saved yet), with the background compile of ``auto`` allowed."""
    monkeypatch.setenv("FMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FMCHAT_AUTO_COMPILE", "1")
    return tmp_path / "cache"


def _session(model_dir, dtype="float32", max_new_tokens=16, **load) -> ChatSession:
    backend = load_backend(RunConfig(model=str(model_dir), device="cpu", dtype=dtype, ctx=512, **load))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    return ChatSession(backend, SessionConfig(gen=gen))


def _reply(session: ChatSession, text: str) -> list[int]:
    session.run_turn(text)
    return list(session.messages[-1].token_ids)


def _eager(model_dir, dtype="float32") -> list[list[int]]:
    s = _session(model_dir, dtype=dtype, compile="eager", kernel="fmc")
    return [_reply(s, t) for t in TURNS]


def _entries(home) -> list:
    root = home / "compiled"
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_chats_eagerly_during_the_background_compile_then_switches(tiny_model, compile_home, dtype):
    """The chat answers while the step compiles on another thread (same model, its own scratch cache); every reply,
    before and after the switch, has the eager path's greedy tokens. bfloat16 too: eager decode must not change
    while another thread compiles (torch's "is compiling" flag is process-wide; the one-row GEMV swap must not
    fire in the eager thread)."""
    eager = _eager(tiny_model, dtype)
    s = _session(tiny_model, dtype=dtype)
    b = s.backend
    build = b._build
    assert build is not None and b._step is None and b.kernel == "fmc"
    # The chat goes first: the build waits while replies run (tracing holds the GIL, compiling takes the cores).
    first = [_reply(s, t) for t in TURNS]
    assert build.started is None and b.decode_status()["phase"] == "waiting for the chat to be idle", build.phase
    if dtype == "float32":
        assert first == eager
    deadline = time.monotonic() + 60
    while build.started is None:  # idle for a second: the build begins
        assert time.monotonic() < deadline, build.phase
        time.sleep(0.1)
    during, rounds = 0, 0
    while True:  # whole conversations, again and again, until the compile has finished
        status = b.decode_status()
        compiling = status["state"] == "compiling"
        s.reset()
        got, paths = [], []
        for t in TURNS:
            got.append(_reply(s, t))
            paths.append(s.messages[-1].stats.decode_path)
        # float32: every reply equals the eager path's, whatever ran beside it. bfloat16: the replies that ended
        # while the step was being compiled (Dynamo's trace, inductor's codegen) do; compiled ones are not compared
        # (its GEMV rounds otherwise: tests/test_decode.py::test_compiled_bf16_step_tracks_eager), nor one that
        # overlapped the end of the build (it diverged, twice at the same token, in bfloat16: docs/decode.md)
        same = [i for i, p in enumerate(paths) if dtype == "float32" or p.startswith("eager (compiled step: compiling")]
        assert [got[i] for i in same] == [eager[i] for i in same], (rounds, compiling, paths)
        # a reply that ended while the build was still under way says so (the switch waits for the next turn)
        during += sum(p.startswith("eager (compiled step: ") for p in paths)
        if compiling:
            assert status["path"] == "eager" and status["phase"] and status["elapsed_s"] is not None, status
        rounds += 1
        if not compiling:
            break
    assert during >= 1  # replies ran during the compile (it starts at load and takes far longer than a reply)
    assert build.error is None, build.error
    assert b._step is not None  # switched at a turn boundary
    assert b.decode_status()["path"] == "compiled"
    s.reset()
    calls = {"n": 0}
    real = b._step.__call__

    class Counting:
        covers = staticmethod(b._step.covers)

        def __call__(self, token, position):
            calls["n"] += 1
            return real(token, position)

    step, b._step = b._step, Counting()
    got = [_reply(s, t) for t in TURNS]
    b._step = step
    if dtype == "float32":
        assert got == eager
    assert calls["n"] > 20  # the replies really went through the compiled step
    assert s.messages[-1].stats.decode_path.startswith("compiled (inductor")
    assert b.cached_tokens() == len(s.ledger) == b.cache.seq_lens_list()[0] == int(b.cache.layers[0].seq_lens[0])
    assert len(_entries(compile_home)) == 1  # compiled once, saved for the next launch


def _subprocess_load(model_dir, home, inductor_dir) -> dict:
    """A new process (as a relaunch) with torch's own compile caches empty (the inductor dir fmchat keeps, and
    torch's default one): only fmchat's saved artifact can help."""
    import shutil

    shutil.rmtree(home / "compiled" / "inductor", ignore_errors=True)
    code = f"""
import json, torch
torch.set_num_threads({torch.get_num_threads()})
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine import ChatSession, GenerationConfig, SessionConfig
b = load_backend(RunConfig(model={str(model_dir)!r}, device="cpu", dtype="float32", ctx=512, compile="compiled"))
s = ChatSession(b, SessionConfig(gen=GenerationConfig(max_new_tokens=16, temperature=0.0, seed=0)))
ids = []
for t in {TURNS!r}:
    s.run_turn(t)
    ids.append(list(s.messages[-1].token_ids))
print(json.dumps({{"status": b.decode_path, "ids": ids, "decode": b.decode_status()}}))
"""
    env = dict(os.environ, FMCHAT_CACHE_DIR=str(home), TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_compiled_step_is_saved_loaded_by_the_next_launch_and_rebuilt_when_corrupt(tiny_model, compile_home, tmp_path):
    eager = _eager(tiny_model)
    first = _session(tiny_model, compile="compiled")
    assert first.backend.decode_path.startswith("compiled (inductor AOT, "), first.backend.decode_path
    assert "cached" not in first.backend.decode_path  # nothing was saved yet
    (entry,) = _entries(compile_home)
    meta = json.loads((entry / "meta.json").read_text())
    assert (
        meta["key"]["load"]["ctx"] == 512 and meta["key"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    assert meta["key"]["threads"] == torch.get_num_threads() and meta["key"]["load"]["dtype"] == "float32"
    assert (entry / AOT_PACKAGE).stat().st_size == meta["bytes"] > 0

    # the next launch: a new process whose torch caches are empty loads the saved step (a cache hit), same tokens
    again = _subprocess_load(tiny_model, compile_home, tmp_path / "inductor-fresh")
    assert again["status"].startswith("compiled (inductor AOT, cached, "), again["status"]
    assert again["decode"]["cached"] is True and again["ids"] == eager

    # a corrupt entry (bytes flipped in the middle): the load notices, compiles afresh, saves a good entry again
    data = bytearray((entry / AOT_PACKAGE).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (entry / AOT_PACKAGE).write_bytes(bytes(data))
    s = _session(tiny_model, compile="compiled")
    b = s.backend
    assert b.decode_path.startswith("compiled (inductor AOT, "), b.decode_path
    assert "cached" not in b.decode_path
    assert b._build.rebuilt and "checksum" in b._build.rebuilt, b._build.rebuilt
    assert [_reply(s, t) for t in TURNS] == eager
    (rebuilt,) = _entries(compile_home)
    assert (rebuilt / AOT_PACKAGE).read_bytes() != bytes(data)
    assert b._build.entry.read()  # saved again, and its checksum holds

    # a truncated file or a missing meta.json are refused before torch sees anything (then rebuilt as above)
    from fmchat.backends.transformers.compile_cache import Entry, StaleEntry

    again_entry = Entry(b._build.entry.key, compile_home / "compiled", artifact=AOT_PACKAGE)
    (rebuilt / AOT_PACKAGE).write_bytes(b"")
    with pytest.raises(StaleEntry, match="checksum"):
        again_entry.read()
    (rebuilt / "meta.json").unlink()
    assert not again_entry.exists()


def test_old_names_and_unavailable_auto(tiny_model, monkeypatch):
    """The old names "off"/"on" (saved settings files, scripts) are eager/compiled; with the background compile switched off,
    auto is plain eager on the kernel asked for, and says why in decode_status."""
    from fmchat import settings
    from fmchat.backends.transformers.compiled import decode_choice

    assert RunConfig().compile == "auto"
    assert decode_choice("off") == "eager" and decode_choice("on") == "compiled" and decode_choice(None) == "auto"
    for old in ("off", "on"):
        assert RunConfig.from_saved({"compile": old}).validate() == []
    monkeypatch.setenv("FMCHAT_AUTO_COMPILE", "0")
    b = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", ctx=256))
    assert b._build is None and b.decode_path == "eager" and b.kernel == "sdpa"
    st = b.decode_status()
    assert st["state"] == "unavailable" and "FMCHAT_AUTO_COMPILE" in st["detail"], st
    off = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", ctx=256, compile="off"))
    assert off.decode_path == "eager" and off.decode_status()["state"] == "eager"
    assert settings  # (the settings module reads files through RunConfig.from_saved, checked above)


def test_a_new_entry_removes_the_ones_an_upgrade_left_behind(tmp_path):
    """Saving a step removes the entries of the same model, options and machine built by another version of the step
    code, torch or the kernel choices (nothing would load them again); entries for another context size or thread
    count are live and stay."""
    from fmchat.backends.transformers.compile_cache import Entry

    def key(**changes):
        base = {"format": 1, "model": {"name": "m", "weights": "w1"}, "load": {"ctx": 512, "dtype": "float32"},
                "compile": {"backend": "aot_inductor"}, "code": "old", "torch": "2.13.0", "threads": 2,
                "cpu_capability": "AVX2", "kernel_choices": {"schema": 1}}  # fmt: skip
        return {**base, **changes}

    old_code = Entry(key(), tmp_path, artifact=AOT_PACKAGE)
    other_ctx = Entry(key(load={"ctx": 1024, "dtype": "float32"}), tmp_path, artifact=AOT_PACKAGE)
    other_threads = Entry(key(threads=1), tmp_path, artifact=AOT_PACKAGE)
    for e in (old_code, other_ctx, other_threads):
        e.write(b"package", 1.0)
    assert all(e.exists() for e in (old_code, other_ctx, other_threads))  # (they differ beyond the versions)
    new = Entry(key(code="new", kernel_choices={"schema": 2}), tmp_path, artifact=AOT_PACKAGE)
    new.write(b"new package", 2.0)
    assert new.exists() and new.read() == b"new package"
    assert not old_code.exists() and not old_code.dir.exists()
    assert other_ctx.exists() and other_threads.exists()
    downgraded = Entry(key(code="new", torch="2.12.0"), tmp_path, artifact=AOT_PACKAGE)  # another torch: same rule
    downgraded.write(b"package", 1.0)
    assert downgraded.exists() and not new.dir.exists() and other_ctx.exists() and other_threads.exists()

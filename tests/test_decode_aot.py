"""The compiled decode step ahead of time (AOTInductor, ``compiled.AotStep``), through ``fmchat run``: the first launch
replies eagerly and compiles the step for the next one; the second launch loads the saved package with the model
and decodes compiled from its first reply, with the same greedy float32 tokens; a launch that leaves while a
compile is under way (Ctrl+C skips it) exits cleanly with its code, not with an abort from the compile's thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import build_tiny_model

from fmchat.backends.transformers.compile_cache import AOT_PACKAGE

PROMPTS = ["Hello there.", "Tell me about the sea."]


def _env(home):
    (home / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, FMCHAT_CACHE_DIR=str(home / "cache"), FMCHAT_AUTO_COMPILE="1", PYTHONUNBUFFERED="1",
                TMPDIR=str(home / "tmp"))  # fmt: skip


def _run(model, home, *extra) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "fmchat", "run", *PROMPTS, "--model", str(model), "--dtype", "float32", "--ctx", "512",
           "--max-new-tokens", "12", "--temperature", "0", "--no-save", "--json", *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(home), timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")], r.stderr


def _saved(home) -> list:
    root = home / "cache" / "compiled"
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def test_run_compiles_for_the_next_launch_which_decodes_compiled_from_its_first_reply(tiny_model, tmp_path):
    eager, _ = _run(tiny_model, tmp_path, "--compile", "eager")
    assert [t["decode_path"] for t in eager] == ["eager", "eager"]

    first, err = _run(tiny_model, tmp_path)  # auto: nothing saved yet: eager replies at once, then the compile
    assert all(t["decode_path"].startswith("eager") for t in first), [t["decode_path"] for t in first]
    assert "compiling the decode step for the next launch" in err
    (entry,) = _saved(tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"]["compile"]["backend"] == "aot_inductor" and (entry / AOT_PACKAGE).stat().st_size == meta["bytes"]

    second, err = _run(tiny_model, tmp_path)  # the saved package is loaded with the model: compiled from reply one
    assert all(t["decode_path"].startswith("compiled (inductor AOT, cached, ") for t in second), [t["decode_path"] for t in second]
    assert "compiling" not in err
    assert [t["reply"] for t in second] == [t["reply"] for t in first] == [t["reply"] for t in eager]
    assert len(_saved(tmp_path)) == 1
    # each load unpacks the package's programs into $TMPDIR; both launches left (os._exit) without a trace there
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith(("aotinductor_", "fmchat-aot")))
    assert left == []


def test_leaving_during_the_compile_exits_cleanly(smol_tokenizer, tmp_path):
    """Ctrl+C while ``run`` compiles the step for the next launch: the reply is out, the compile is skipped, exit 0
    and nothing else on stderr (an interpreter shutdown under the compile's thread during torch's trace of the model
    printed hundreds of "nanobind: leaked" lines, or aborted: exit 134, "terminate called without an active
    exception"). 16 layers, so that the trace lasts a few seconds."""
    model = build_tiny_model(tmp_path / "deep", smol_tokenizer, layers=16)
    cmd = [sys.executable, "-m", "fmchat", "run", "Hello there.", "--model", str(model), "--dtype", "float32",
           "--ctx", "256", "--max-new-tokens", "6", "--temperature", "0", "--no-save"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    seen = ""
    deadline = time.monotonic() + 600
    while "decode step: compiling (torch.export" not in seen:  # the trace: the phase whose shutdown aborted
        line = p.stderr.readline()
        assert line or p.poll() is None, seen[-2000:]
        seen += line
        assert time.monotonic() < deadline, seen[-2000:]
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=300)
    seen += rest
    assert p.returncode == 0, seen[-3000:]
    assert out.strip() and "compile skipped" in seen
    # nothing from the interpreter's shutdown under the compile's thread: an abort, a traceback, or the
    # "nanobind: leaked ..." lines of triton's bindings torn down while the trace holds them
    assert not [w for w in ("terminate called", "Traceback", "leaked", "Error") if w in seen], seen[-3000:]
    assert _saved(tmp_path) == []  # nothing half-written counts as a saved step


def test_one_layer_program_serves_every_layer_and_another_models_package_is_refused(smol_tokenizer, tmp_path, monkeypatch):
    """The package holds two programs, one decoder layer and the head, whatever the layer count: the cold compile
    does not grow with the layers. The step compiled on a 2-layer model runs a 5-layer model of the same layer
    shapes (each layer bound to its own weights) and passes the check against its eager forward.

    The saved package is checked against the eager forward after it is loaded. Its weights are the model's own
    (bound at load), but what the trace baked in is not: here the norms' epsilon. The step compiled for one model,
    loaded over another with the same tensors and another epsilon, gives other logits and is refused."""
    import zipfile

    import pytest

    from fmchat.backends.transformers.compiled import AotStep
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    monkeypatch.setenv("FMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    a = load_backend(RunConfig(model=str(build_tiny_model(tmp_path / "a", smol_tokenizer)), device="cpu",
                               dtype="float32", ctx=256, compile="compiled"))  # fmt: skip
    assert a._step.kind == "aot" and a._build.entry.exists()
    package = a._build.entry.artifacts
    other = build_tiny_model(tmp_path / "b", smol_tokenizer, rms_norm_eps=0.5)  # same seed: the same weights
    b = load_backend(RunConfig(model=str(other), device="cpu", dtype="float32", ctx=256, compile="eager", kernel="fmc"))
    ok = AotStep(a.model, a._new_cache(), "cpu")  # its own model: accepted
    ok.load(package)
    ok.warm_up()
    names = [n.split("/") for n in zipfile.ZipFile(package).namelist()]
    programs = {p[p.index("aotinductor") + 1] for p in names if "aotinductor" in p[:-1]}
    assert programs == {"layer", "head"}, programs
    deeper = build_tiny_model(tmp_path / "c", smol_tokenizer, layers=5)
    c = load_backend(RunConfig(model=str(deeper), device="cpu", dtype="float32", ctx=256, compile="eager", kernel="fmc"))
    five = AotStep(c.model, c.cache, "cpu")
    five.load(package)
    assert len(five.layers_run) == 5
    five.warm_up()  # the 2-layer model's package, 5 layers deep: the same logits as eager
    wrong = AotStep(b.model, b.cache, "cpu")
    wrong.load(package)  # the constants bind (same names and shapes) ...
    with pytest.raises(ValueError, match="differ from eager"):
        wrong.warm_up()  # ... but the epsilon traced into the package is the other model's

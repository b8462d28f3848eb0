"""The headless CLI through its public entry point: `fmchat run`, `chat --plain`, `models`, `bench turns`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from fmchat.cli import app
from fmchat.text import neutralize

runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_run_json_reports_every_stats_field_and_reuses_the_cache(tiny_model):
    r = cli("run", "Hello!", "And then?", "--model", tiny_model, "--temperature", "0", "--max-new-tokens", "8", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    rows = json_lines(r.stdout)
    assert [row["turn"] for row in rows] == [1, 2]
    assert rows[0]["user"] == "Hello!" and isinstance(rows[0]["reply"], str)
    for key in ("prompt_tokens", "reused_tokens", "prefilled_tokens", "generated_tokens", "ttft_ms", "prefill_tok_s",
                "decode_tok_s", "ctx_used", "ctx_size", "seq_lens", "kv_bytes", "weights_bytes", "rss_mb",
                "peak_rss_mb", "gpu_mem_mb", "device", "dtype"):  # fmt: skip
        assert key in rows[1], key
    assert rows[1]["reused_tokens"] > 0 and rows[1]["seq_lens"] == [rows[1]["ctx_used"]]
    assert rows[1]["dtype"] == "float32" and rows[1]["device"] == "cpu"


def test_run_without_kv_cache_reprefills_everything(tiny_model):
    r = cli("run", "Hello!", "And then?", "--model", tiny_model, "--no-kv-cache", "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert r.exit_code == 0, r.output
    rows = json_lines(r.stdout)
    assert all(row["reused_tokens"] == 0 and row["prefilled_tokens"] == row["prompt_tokens"] for row in rows)


def test_run_reads_turns_from_stdin_and_from_a_script(tiny_model, tmp_path):
    r = cli("run", "--model", tiny_model, "--max-new-tokens", "4", "--json", input="one\ntwo\nthree\n")
    assert r.exit_code == 0, r.output
    assert [row["user"] for row in json_lines(r.stdout)] == ["one", "two", "three"]
    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"turns": ["alpha", "beta"]}))
    r = cli("run", "--model", tiny_model, "--max-new-tokens", "4", "--script", script, "--json")
    assert r.exit_code == 0, r.output
    assert [row["user"] for row in json_lines(r.stdout)] == ["alpha", "beta"]


def test_bad_input_is_one_line_and_exit_2(tiny_model, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text(json.dumps({"turns": [1, 2]}))
    cases = [
        (("run", "hi", "--model", "no-such-model"), "unknown model 'no-such-model'"),
        (("run", "", "--model", tiny_model), "empty prompt"),
        (("run", "--model", tiny_model, "--script", tmp_path / "missing.json"), "no such file"),
        (("run", "--model", tiny_model, "--script", bad_json), "not valid JSON"),
        (("run", "--model", tiny_model, "--script", wrong_shape), "'turns' list of strings"),
        (("run", "word " * 200, "--model", tiny_model, "--ctx", "64"), "context window is 64 tokens"),
        (("run", "hi", "--model", tiny_model, "--dtype", "float8"), "unknown dtype"),
        (("run", "hi", "--model", "some-org/not-cached"), "not in the Hugging Face cache"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("fmchat: error")]
        assert len(errors) == 1


def test_models_lists_aliases_and_availability():
    r = cli("models", "--json")
    assert r.exit_code == 0
    rows = {row["alias"]: row for row in json.loads(r.stdout)["aliases"]}
    assert set(rows) == {"smollm2-135m", "phi-3.5", "qwen2.5-0.5b", "llama-3.2-1b", "gemma3-270m"}
    assert rows["smollm2-135m"]["available"] is True and rows["smollm2-135m"]["where"].endswith(".gguf")
    assert rows["gemma3-270m"]["available"] is True  # from its PyPI package (chunks, assembled on first use)
    assert rows["phi-3.5"]["available"] is False  # HF_HUB_OFFLINE and an empty cache in tests
    r = cli("models")
    assert r.exit_code == 0 and "qwen2.5-0.5b" in r.stdout and "(default)" in r.stdout


def test_bench_turns_compares_cache_on_and_off(tiny_model, tmp_path):
    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"turns": ["Hello!", "What is 12 times 7?", "Thanks!", "Bye"]}))
    r = cli("bench", "turns", "--model", tiny_model, "--script", script, "--turns", "3", "--max-new-tokens", "8", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["turns"]) == 3
    assert result["identical"] is True and result["first_divergence"] is None
    rows = result["turns"]
    assert rows[2]["reused_on"] > 0 and rows[2]["prefilled_off"] == rows[2]["prompt_tokens_off"]
    assert "turn 3: TTFT" in result["summary"]
    r = cli("bench", "turns", "--model", tiny_model, "--script", script, "--turns", "2", "--max-new-tokens", "4")
    assert r.exit_code == 0 and "TTFT on (ms)" in r.stdout and "token-identical in 2/2 turns" in r.stdout


def test_neutralize_shows_control_characters():
    s = neutralize("a\x1b[2Jb\x07c\r\nd\te\x9bf")
    assert "\x1b" not in s and "\x07" not in s and "\r" not in s and "\x9b" not in s
    assert s == "a\u241b[2Jb\u2407c\u240d\nd\te\\x9bf"


def _spawn_repl(model, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen(
        [sys.executable, "-m", "fmchat", "chat", "--plain", "--model", str(model), *map(str, extra)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _read_until(proc, needle: str, timeout: float = 120.0) -> str:
    buf = ""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        assert time.monotonic() < deadline, f"timed out waiting for {needle!r}; got {buf[-500:]!r}"
        ch = proc.stdout.read(1)
        assert ch, f"process ended before {needle!r}: {buf[-500:]!r} {proc.stderr.read()[-2000:]}"
        buf += ch
    return buf


def test_plain_repl_streams_and_ctrl_c_cancels_the_reply_not_the_program(tiny_model):
    proc = _spawn_repl(tiny_model, "--max-new-tokens", "1900", "--ctx", "2048", "--temperature", "0")
    try:
        _read_until(proc, "you> ")
        proc.stdin.write("   \n/help\nWrite a long story.\n")
        proc.stdin.flush()
        _read_until(proc, "/reset")  # the /help line
        _read_until(proc, "bot> ")
        proc.stdout.read(20)  # some of the reply has streamed
        proc.send_signal(signal.SIGINT)
        out = _read_until(proc, "you> ")
        assert "cancelled]" in out
        proc.stdin.write("/stats\n")
        proc.stdin.flush()
        stats = _read_until(proc, "you> ")
        assert "cancelled: True" in stats and "seq_lens:" in stats
        proc.stdin.write("/reset\n/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_bench_load_times_first_and_later_loads(tiny_model):
    r = cli("bench", "load", "--model", tiny_model, "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    loads = json.loads(r.stdout.splitlines()[-1])["loads"]
    assert [row["load"] for row in loads] == [1, 2]
    assert all(row["seconds"] > 0 and row["converted"] is False for row in loads)  # an HF dir needs no conversion
    r = cli("bench", "load", "--model", "no-such-model")
    assert r.exit_code == 2 and "unknown model" in r.stderr


def test_run_with_the_fmc_kernel_reports_a_preallocated_cache(tiny_model):
    r = cli("run", "Hello!", "Again.", "--model", tiny_model, "--kernel", "fmc", "--ctx", "256", "--dtype", "float32",
            "--temperature", "0", "--max-new-tokens", "6", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json_lines(r.stdout)
    # 2 layers x K and V x 2 kv heads x 16 dims x 256 positions x 4 bytes, from the first token on
    assert [row["kv_bytes"] for row in rows] == [2 * 2 * 2 * 16 * 256 * 4] * 2
    assert rows[1]["seq_lens"] == [rows[1]["ctx_used"]] and rows[1]["reused_tokens"] > 0
    r = cli("run", "hi", "--model", tiny_model, "--kernel", "flash9")
    assert r.exit_code == 2 and "unknown attention kernel 'flash9'" in r.stderr

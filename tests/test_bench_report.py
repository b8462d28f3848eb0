"""The one report path of `fmchat bench`: the header (machine, ISA, threads, commit, dates, load, versions,
command line) and one printer (the header then the tables, or one JSON object with "header" plus the old keys)."""

from __future__ import annotations

import datetime as dt
import json
import re
from types import SimpleNamespace

import torch

from fmchat.bench import report


def _utc(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_header_fields():
    import transformers

    run = report.begin("bench test", argv=["/somewhere/.venv/bin/fmchat", "bench", "load", "--model", "a b", "--json"])
    h = report.finish(run)
    assert h["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert h["threads"] == torch.get_num_threads()
    assert h["fmchat_commit"] == "n/a" or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", h["fmchat_commit"]), h["fmchat_commit"]
    start, end = _utc(h["started_utc"]), _utc(h["ended_utc"])
    assert start <= end and abs((dt.datetime.now(dt.UTC) - end).total_seconds()) < 60
    for k in ("load_avg_1m_start", "load_avg_1m_end"):
        assert isinstance(h[k], (int, float)) and h[k] >= 0, (k, h[k])
    assert h["logical_cores"] >= 1 and (h["physical_cores"] is None or 1 <= h["physical_cores"] <= h["logical_cores"])
    assert h["ram_bytes"] > 0 and h["cpu"]
    assert h["torch"] == torch.__version__
    assert h["transformers"] == transformers.__version__
    assert h["command"] == "fmchat bench load --model 'a b' --json"
    json.dumps(h)  # plain JSON values only


def test_a_capped_instruction_set_is_said_with_what_the_cpu_has(monkeypatch, capsys):
    """ATEN_CPU_CAPABILITY (and oneDNN's / MKL's caps) make an AVX-512 machine run the AVX2 code paths: the header
    says so beside the capability torch reports, and says nothing when no cap is set."""
    for var in report.ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    assert report.begin("bench test").header["cpu_isa_cap"] is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    run = report.begin("bench test", argv=["fmchat", "bench", "test"])
    has = "AVX512" if torch.cpu._is_avx512_supported() else "AVX2" if torch.cpu._is_avx2_supported() else "n/a"
    assert run.header["cpu_isa_cap"] == f"capped by ONEDNN_MAX_CPU_ISA=AVX2; the CPU has {has}"
    report.emit(run, {}, False, lambda: None)
    isa = torch.backends.cpu.get_cpu_capability()
    assert f"cpu isa  {isa} (capped by ONEDNN_MAX_CPU_ISA=AVX2; the CPU has {has}) · threads" in capsys.readouterr().out


def test_commit_is_na_outside_a_git_checkout(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    assert report.fmchat_commit(tmp_path) == "n/a"


def test_text_header_comes_before_the_tables_and_unknowns_print_na(capsys):
    run = report.begin("bench test", argv=["fmchat", "bench", "test"])
    run.header["physical_cores"] = None  # psutil could not tell
    result = {"x": 1}
    out = report.emit(run, result, False, lambda: print("THE TABLE"))
    text = capsys.readouterr().out
    assert text.index("fmchat bench test") < text.index("THE TABLE")
    assert f"cpu isa  {torch.backends.cpu.get_cpu_capability()} · threads {torch.get_num_threads()}" in text
    assert "n/a physical cores" in text and "command  fmchat bench test" in text
    assert out is result and list(out) == ["header", "x"]
    assert report.num(None, ".1f") == "n/a" and report.num(0.0, ".1f") == "0.0"


class _ScriptedSession:
    """Just what bench turns drives: configure, reset, run_turn -> .stats, messages[-1].token_ids, config, backend."""

    def __init__(self):
        self.backend = SimpleNamespace(model_name="stub", name="stub", device="cpu", dtype="float32", decode_path="eager")  # fmt: skip
        self.config = SimpleNamespace(kv_cache=True, gen=SimpleNamespace(max_new_tokens=4))
        self.reset()

    def configure(self, **fields):
        for k, v in fields.items():
            setattr(self.config, k, v)

    def reset(self):
        self.messages, self.n = [], 0

    def run_turn(self, text):
        self.n += 1
        prompt = 10 * self.n
        reused = prompt - 10 if self.config.kv_cache else 0
        stats = SimpleNamespace(prompt_tokens=prompt, ctx_used=prompt + 4, ttft_ms=1.0 + (prompt - reused) / 10,
                                reused_tokens=reused, prefilled_tokens=prompt - reused, decode_tok_s=None)  # fmt: skip
        self.messages.append(SimpleNamespace(token_ids=[1, 2, self.n]))
        return SimpleNamespace(stats=stats, reply=f"reply {self.n}")


TURNS_KEYS = ["model", "backend", "device", "dtype", "max_new_tokens", "turns", "identical", "identical_turns",
              "first_divergence", "last_turn_ttft_ratio", "summary"]  # fmt: skip


def test_bench_turns_json_is_the_header_plus_its_old_keys(capsys):
    from fmchat.bench.turns import bench_turns

    res = bench_turns(_ScriptedSession(), ["a", "b", "c"], json_out=True)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.strip()]
    assert len(lines) == 1  # ONE JSON object on stdout; progress stays on stderr
    assert "[bench] cache on  turn  1" in captured.err
    out = json.loads(lines[0])
    assert list(out) == ["header", *TURNS_KEYS]
    assert out == json.loads(json.dumps(res))
    assert out["header"]["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert out["identical"] is True and len(out["turns"]) == 3 and out["turns"][2]["reused_on"] == 20
    assert [t["reply"] for t in out["turns"]] == ["reply 1", "reply 2", "reply 3"]  # the cache-on pass's replies
    assert out["header"]["decode_path"] == "eager"

    bench_turns(_ScriptedSession(), ["a", "b"], json_out=False)
    text = capsys.readouterr().out
    assert text.index("fmchat bench turns") < text.index("cpu isa") < text.index("TTFT on (ms)")
    assert "token-identical in 2/2 turns" in text and " 0.0 " not in text  # decode tok/s unknown: n/a, not 0


def test_bench_load_json_carries_the_header_and_its_old_keys(tiny_model, capsys):
    from fmchat.bench.load import bench_load

    res = bench_load(str(tiny_model), repeats=1, json_out=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1  # ONE JSON object on stdout
    out = json.loads(lines[0])
    assert next(iter(out)) == "header" and {"model", "device", "dtype", "loads"} <= set(out)
    assert out == json.loads(json.dumps(res))
    assert out["header"]["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert [row["load"] for row in out["loads"]] == [1, 2]
    assert all(row["seconds"] > 0 and row["converted"] is False for row in out["loads"])

    bench_load(str(tiny_model), repeats=0, json_out=False)
    text = capsys.readouterr().out
    assert text.index("fmchat bench load") < text.index("cpu isa") < text.index("load 1:")


def test_bench_memory_prints_an_unknown_kv_size_as_na(capsys):
    from fmchat.bench.memory import print_table

    policy = {"policy": "none", "turns_completed": 0, "stopped": {"turn": 1, "error": "full"}, "max_ctx_used": 0,
              "max_kv_bytes": None, "actions": 0, "evicted_tokens": 0, "first_action_turn": None,
              "ttft_ms_median_before": None, "ttft_ms_median_after": None, "prefilled_median_after": None,
              "recall": None, "probe_reply": None, "continuation_ppl": None, "turns": []}  # fmt: skip
    print_table({"model": "m", "backend": "llamacpp", "device": "cpu", "dtype": "q4", "ctx": 64, "turns": 1, "policies": [policy]})
    text = capsys.readouterr().out
    assert "0 B" not in text and "n/a" in text


def test_header_names_the_decode_path_and_the_chosen_kernels(capsys):
    """bench decode / backends / shape: the header says how tokens were decoded and which weight kernels the load
    chose (fmchat_kernels.quant.select), with the CPU capability they were chosen for."""
    from fmchat_kernels.quant import select

    select.reset()
    try:
        select.use({"int8": {"prefill": "bf16", "prefill_min_rows": 16, "chunk_rows": 1024}})
        run = report.begin("bench test", argv=["fmchat", "bench", "test"])
        paths = report.decode_paths({"eager": "eager", "int8": "eager", "compiled": "compiled (inductor, 9.0 s)"})
        assert paths == "eager (eager, int8) · compiled (inductor, 9.0 s) (compiled)"
        out = report.emit(run, {"x": 1}, False, lambda: print("THE TABLE"), decode_path=paths)
        text = capsys.readouterr().out
        h = out["header"]
        assert h["decode_path"] == paths and h["kernels"]["int8"]["prefill"] == "bf16" and h["kernels"]["source"] == "set"
        assert h["kernels"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert f"decode   {paths}" in text
        assert "kernels  int8: 1 row int8pack (eager) / fused (compiled), prefill bf16 GEMM" in text
        assert "prefill bf16 GEMM from 16 rows (weight rows 1024 at a time)" in text
        assert text.index("cpu isa") < text.index("kernels  ") < text.index("THE TABLE")
        json.dumps(h)

        # rows loaded in other processes (bench shape): one kernels line per row; unknowns print n/a
        run = report.begin("bench test", argv=["fmchat", "bench", "test"])
        per_row = {"int8 row": report.kernel_choices(), "bf16 row": None}
        report.emit(run, {}, False, lambda: None, kernels=per_row)
        text = capsys.readouterr().out
        assert "kernels  [int8 row] int8: 1 row" in text and "kernels  [bf16 row] n/a" in text and "decode   n/a" in text
    finally:
        select.reset()


def test_bench_quant_header_names_each_workers_kernels(tiny_model):
    """`fmchat bench quant` loads each scheme in its own process: the header names the kernels each worker chose (its
    own kernel selection) and its decode path, not the parent's defaults; the int8 row is measured against fp32."""
    from typer.testing import CliRunner

    from fmchat.cli import app

    args = ["bench", "quant", "--model", str(tiny_model), "--schemes", "fp32,int8", "--turns", "2", "--max-new-tokens", "4",
            "--threads", "1", "--json"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.splitlines()[-1])
    k = result["header"]["kernels"]
    assert set(k) == {"fp32", "int8"}
    assert k["int8"]["line"].startswith("int8: 1 row ") and k["int8"]["int8"]["one_row_eager"] in ("int8pack", "q8", "f32")
    assert k["int8"]["source"] in ("measured", "cached")  # the worker's own selection, not the parent's defaults
    assert result["header"]["decode_path"] == "eager (fp32, int8)"
    int8 = next(s for s in result["schemes"] if s["scheme"] == "int8")
    assert int8["agree_total"] > 0 and int8["kernels"] == k["int8"]
    # the decode-step count runs the same reply tokens through one-token steps
    assert int8["step_agree_total"] == int8["agree_total"] and 0 <= int8["step_agree_tokens"] <= int8["step_agree_total"]

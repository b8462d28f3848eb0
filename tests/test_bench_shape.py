"""`fmchat bench shape`: random weights of a given architecture, every --quant row and llama.cpp's Q8_0 row, each
in its own process, through the real CLI. Small shapes (2 layers) and short prompts keep it quick."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from fmchat.cli import app

runner = CliRunner()
QUANTS = ("bf16", "int8", "int4", "log8")
SMALL = ("--ttft-tokens", "48", "--contexts", "16,40", "--new-tokens", "3")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tiny_llama(path):
    """A 2-layer Llama with grouped-query attention and Llama 3's RoPE scaling (llama.cpp: rope_freqs)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 256},
           "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    path.write_text(json.dumps(cfg))
    return path, cfg


def _tiny_phi3(path):
    """A 2-layer Phi-3 with fused qkv and gate_up projections and longrope factors (llama.cpp: rope_factors_*)."""
    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 512,
           "max_position_embeddings": 4096, "original_max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_scaling": {"type": "longrope", "long_factor": [1.0 + i / 4 for i in range(16)], "short_factor": [1.0] * 16},
           "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}  # fmt: skip
    path.write_text(json.dumps(cfg))
    return path, cfg


def _kv_formula(cfg, dtype_bytes=2):
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def test_every_quant_and_llamacpp_on_the_same_random_phi3_weights(tmp_path):
    path, cfg = _tiny_phi3(tmp_path / "config.json")
    r = cli("bench", "shape", path, "--quant", ",".join(QUANTS), *SMALL, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["random_weights"] is True and res["header"]["cpu_isa"]
    assert [row["row"] for row in res["rows"]] == [*QUANTS, "llama.cpp Q8_0"]
    for row in res["rows"]:
        assert row["load_s"] > 0 and row["ttft_ms"] > 0, row
        assert row["peak_rss_bytes"] >= row["peak_rss_load_bytes"] > 0, row
        assert row["weights_bytes"] > 0, row
        assert set(row["decode_tok_s"]) == {"16", "40"} and all(v > 0 for v in row["decode_tok_s"].values()), row
        assert row["kv_bytes_per_token"] == _kv_formula(cfg), row  # bf16 K/V here, f16 in llama.cpp: 2 bytes both
    by = {row["row"]: row for row in res["rows"]}
    assert by["int8"]["weights_bytes"] < by["bf16"]["weights_bytes"]
    assert by["int4"]["weights_bytes"] < by["int8"]["weights_bytes"]
    llama = by["llama.cpp Q8_0"]
    assert llama["backend"] == "llamacpp" and llama["as_llama"] is False  # llama.cpp runs the phi3 GGUF itself
    assert [x["row"] for x in res["vs_llamacpp"]] == list(QUANTS)
    assert all(x["decode_tok_s"]["16"] > 0 for x in res["vs_llamacpp"])
    # the GGUF: gguf's names for Phi-3, fused qkv / gate+up, longrope factors, Q8_0 matrices
    from fmchat.bench.shape_gguf import iter_names

    names = set(iter_names(llama["gguf"]))
    assert {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight", "rope_factors_long.weight", "output.weight"} <= names
    assert llama["quant"] == "Q8_0" and llama["dtype"] == "Q8_0"
    assert "[bench shape] random weights: generating" in r.stderr and "[bench shape] GGUF Q8_0: writing" in r.stderr
    for q in (*QUANTS, "llama.cpp Q8_0"):
        assert f"[bench shape] {q}: loaded in" in r.stderr and f"[bench shape] {q}: decode @40" in r.stderr
    assert "warning" not in r.stderr.lower()


def test_a_llama_shape_prints_the_header_and_reuses_its_weights(tmp_path):
    path, cfg = _tiny_llama(tmp_path / "tiny-llama.json")
    r = cli("bench", "shape", path, "--quant", "bf16", *SMALL)
    assert r.exit_code == 0, r.output + r.stderr
    out = r.stdout
    assert out.index("fmchat bench shape") < out.index("cpu isa") < out.index("random weights") < out.index("TTFT 48 (ms)")
    assert "shape    tiny-llama · LlamaForCausalLM · 2 layers" in out
    table = [ln for ln in out.splitlines() if ln.startswith(("│ bf16", "│ llama.cpp Q8_0")) and "GiB" in ln]
    assert len(table) == 2 and all("n/a" not in ln for ln in table), out
    kv = f"{_kv_formula(cfg):,} B"
    assert all(kv in ln for ln in table), out
    assert "vs llama.cpp Q8_0" in out and "(as llama)" not in out
    assert "random weights generated in" in out and "GGUF Q8_0 written in" in out
    # the next run finds the weights and the GGUF in the cache (keyed by the config's hash): nothing is rewritten
    from fmchat.bench.shape_gguf import write_gguf
    from fmchat.bench.shape_weights import ensure_weights

    weights, gen = ensure_weights(cfg, lambda m: None)
    gguf, info = write_gguf(weights, cfg, lambda m: None)
    assert gen["cached"] and info["cached"] and not info["as_llama"] and gguf.name == "llamacpp-q8_0.gguf"
    from fmchat.bench.shape_gguf import iter_names

    assert {"rope_freqs.weight", "blk.1.attn_k.weight", "token_embd.weight"} <= set(iter_names(gguf))
    assert "output.weight" not in set(iter_names(gguf))  # tied: llama.cpp uses token_embd


def test_shipped_shapes_are_the_real_architectures():
    """The shipped config.jsons build in transformers with the real models' parameter counts."""
    from fmchat.bench.shape import aliases, describe, resolve
    from fmchat.bench.shape_weights import tensor_plan

    expected = {"phi-3.5": 3_821_079_552, "qwen2.5-0.5b": 494_032_768, "llama-3.2-1b": 1_235_814_400}
    assert set(aliases()) == set(expected)
    for name, params in expected.items():
        _, config, source = resolve(name)
        assert "huggingface.co" in source and "_fmchat_source" not in config
        assert sum(math.prod(s) for _, s in tensor_plan(config)) == params, name
    phi = describe(resolve("phi-3.5")[1])
    assert (phi["layers"], phi["hidden"], phi["ffn"], phi["heads"], phi["kv_heads"], phi["vocab"]) == (32, 3072, 8192, 32, 32, 32064)
    assert phi["kv_bytes_per_token_bf16"] == 2 * 32 * 32 * 96 * 2


def test_a_bad_name_is_one_line_listing_the_aliases(tmp_path):
    r = cli("bench", "shape", "no-such-shape")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown shape 'no-such-shape'" in lines[0]
    assert all(a in lines[0] for a in ("phi-3.5", "qwen2.5-0.5b", "llama-3.2-1b"))
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64}')
    r = cli("bench", "shape", bad)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "no model_type" in r.stderr
    r = cli("bench", "shape", "phi-3.5", "--quant", "int9")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "int9" in r.stderr

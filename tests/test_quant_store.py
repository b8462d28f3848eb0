"""Quantized weights kept across launches (fmchat/backends/transformers/quant_store.py): the first integer-scheme load
quantizes and keeps the codes, the next maps them; a damaged entry is rebuilt, never a crash."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from fmchat.backends.transformers import quant_store
from fmchat.backends.transformers.loading import _params_on_meta
from fmchat.cli import app
from fmchat_kernels import quant as kq

runner = CliRunner()
KEPT = "(codes kept from the first load)"


def run(model, quant: str):
    r = runner.invoke(app, ["run", "Hello!", "Name a color.", "--model", str(model), "--quant", quant, "--temperature", "0",
                            "--max-new-tokens", "12", "--compile", "eager", "--no-save", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    loaded = [line for line in r.stderr.splitlines() if "loaded " in line]
    return [json.loads(line)["reply"] for line in r.stdout.splitlines() if line.startswith("{")], loaded[-1]


def entries(quant: str) -> list:
    """The kept files of ``quant`` entries (an entry's meta.json holds its key in clear)."""
    found = []
    for path in sorted(quant_store.paths.quantized_dir().glob("*/" + quant_store.FILE)):
        meta = json.loads((path.parent / "meta.json").read_text())
        if meta["key"]["quant"] == quant:
            found.append(path)
    return found


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_next_run_maps_the_codes_the_first_kept_and_replies_the_same(tiny_model, tmp_path, monkeypatch, quant):
    monkeypatch.setenv("FMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    first, loaded = run(tiny_model, quant)
    assert f"quant {quant}, kernel" in loaded and KEPT not in loaded
    assert len(entries(quant)) == 1
    second, loaded = run(tiny_model, quant)
    assert f"quant {quant} {KEPT}" in loaded
    assert second == first  # greedy: the same codes, the same replies

    # damaged entries: truncated, then a header that is not JSON (same size): quantized afresh, the same replies
    for damage in ("truncate", "header"):
        (path,) = entries(quant)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"#" * 64 + data[72:])
        again, loaded = run(tiny_model, quant)
        assert KEPT not in loaded and again == first, damage
        (path,) = entries(quant)  # written afresh
        assert path.stat().st_size == len(data)
    third, loaded = run(tiny_model, quant)
    assert KEPT in loaded and third == first


def test_codes_of_odd_shapes_are_written_aligned_in_a_safetensors_file_and_map_back(tmp_path, monkeypatch):
    """Tensor sizes that are no multiple of 64 bytes (33 scales, a bias, a norm): padding keeps every tensor 64-byte aligned (torch's int8 kernel
    crashes on a misaligned weight), the file stays one any safetensors reader opens, and the mapped model computes
    exactly what the quantized one does."""
    monkeypatch.setenv("FMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")

    def build():
        # (64 inputs: torch's int8 kernel also crashes on rows of 70 or 33 codes, wherever they are)
        return nn.Sequential(nn.Linear(64, 33), nn.LayerNorm(33))

    torch.manual_seed(0)
    weights = {n: p.detach().clone() for n, p in build().named_parameters()}
    with _params_on_meta():
        quantized = build()
    report = kq.quantize_model(quantized, "int8", rest_dtype=torch.float32, skip=(), fetch=lambda n: weights[n])
    store = quant_store.entry(tmp_path / "w", "int8", torch.float32, "cpu")
    assert quant_store.save(quantized, store, lambda s, f: None)

    with safe_open(str(store.artifacts), "pt") as f:
        names = list(f.keys())
        assert any(n.startswith(quant_store.PAD) for n in names)
        assert torch.equal(f.get_tensor("0.weight_int8"), quantized[0].weight_int8)
    with _params_on_meta():
        mapped = build()
    got = quant_store.load(mapped, store, "int8", torch.float32, lambda s, f: None)
    assert got is not None and got.quantized == report.quantized
    for t in [*mapped.parameters(), *mapped.buffers()]:
        assert t.device.type == "cpu" and t.data_ptr() % quant_store.ALIGN == 0
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(mapped(x), quantized(x))

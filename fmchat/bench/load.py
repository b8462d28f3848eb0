"""`fmchat bench load`: model load time on first use (GGUF conversion included) and on later loads."""

from __future__ import annotations

import os
import tempfile

from rich.console import Console

from . import report


def bench_load(model: str | None, device: str = "auto", dtype: str = "auto", repeats: int = 2, json_out: bool = False) -> dict:
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    run = report.begin("bench load")
    config = RunConfig(model=model, device=device, dtype=dtype, compile="eager")  # load times alone, no compile beside
    rows = []
    saved = os.environ.get("FMCHAT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fmchat-bench-load-") as tmp:
        os.environ["FMCHAT_CACHE_DIR"] = tmp  # a cold conversion cache, thrown away afterwards
        try:
            for i in range(1 + repeats):
                b = load_backend(config)
                r = b.load_report
                rows.append({"load": i + 1, "seconds": round(r.seconds, 2), "converted": r.converted})
                del b
        finally:
            if saved is None:
                os.environ.pop("FMCHAT_CACHE_DIR", None)
            else:
                os.environ["FMCHAT_CACHE_DIR"] = saved
    result = {"model": model or "smollm2-135m", "device": device, "dtype": dtype, "loads": rows}

    def render() -> None:
        c = Console(highlight=False)
        for row in rows:
            what = "first load (GGUF converted to safetensors)" if row["converted"] else "later load (reads the converted safetensors)"
            c.print(f"load {row['load']}: {row['seconds']:.2f} s  {what}")

    return report.emit(run, result, json_out, render)

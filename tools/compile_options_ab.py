"""A/B of compiled-step variants in one process (docs/decode.md, "What changed").

Loads the default model once per variant with ``--compile on`` under different inductor / Dynamo settings,
then times greedy decode after prefilling C tokens, every variant in turn within a round (the VM's speed
moves, so only variants timed side by side are compared). Prints best and median ms per token.

    python tools/compile_options_ab.py VARIANTS_JSON [CONTEXTS] [ROUNDS]

VARIANTS_JSON is a list of objects: ``name``; ``quant`` (none/int8/int4); ``icfg``: inductor config overrides
applied while compiling (e.g. ``{"realize_opcount_threshold": 50}``, inductor's CPU default)
(they override fmchat's own ``INDUCTOR_OPTIONS`` for that variant); ``dcfg``: Dynamo config overrides;
``nomat``: trace without the realized fp32 copy of the query (``fused._realized_fp32``); ``int8param``: int8 weights as frozen
parameters instead of buffers; ``llama``: the llama.cpp backend instead. Example (the realize threshold):

    python tools/compile_options_ab.py '[{"name": "default-50", "quant": "int8",
        "icfg": {"realize_opcount_threshold": 50}}, {"name": "fmchat", "quant": "int8"},
        {"name": "llama.cpp", "llama": 1}]' 128,1024 3
"""

import json
import statistics
import sys
import time

import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config

from fmchat.backends.transformers import compiled
from fmchat.bench.decode import decode_rate, prompt_ids
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine.session import set_threads
from fmchat_kernels import quant
from fmchat_kernels.attention import fused


def int8_as_parameters(on: bool) -> None:
    if on and not hasattr(quant.Int8Linear, "_buffer_from_weight"):
        quant.Int8Linear._buffer_from_weight = quant.Int8Linear.from_weight.__func__

        def from_weight(cls, *a, **k):
            m = quant.Int8Linear._buffer_from_weight(cls, *a, **k)
            for name in ("weight_int8", "scales"):
                setattr(m, name, torch.nn.Parameter(m._buffers.pop(name), requires_grad=False))
            return m

        quant.Int8Linear.from_weight = classmethod(from_weight)
    elif not on and hasattr(quant.Int8Linear, "_buffer_from_weight"):
        quant.Int8Linear.from_weight = classmethod(quant.Int8Linear._buffer_from_weight)
        del quant.Int8Linear._buffer_from_weight


def main() -> None:
    variants = json.loads(sys.argv[1])
    contexts = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "128,1024").split(",")]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    set_threads(None)
    ctx = max(contexts) + 200
    materialize = fused._realized_fp32
    loaded = {}
    for v in variants:
        t0 = time.perf_counter()
        if v.get("llama"):
            loaded[v["name"]] = load_backend(RunConfig(backend="llamacpp", device="cpu", ctx=ctx, threads=torch.get_num_threads()))
            continue
        fused._realized_fp32 = (lambda x: x.float()) if v.get("nomat") else materialize
        int8_as_parameters(bool(v.get("int8param")))
        config = RunConfig(device="cpu", dtype="bfloat16", ctx=ctx, quant=v.get("quant", "none"), compile="on")
        saved = dict(compiled.INDUCTOR_OPTIONS)  # the options fmchat passes to torch.compile win over globals
        compiled.INDUCTOR_OPTIONS.update(v.get("icfg", {}))
        try:
            with inductor_config.patch(v.get("icfg", {})), dynamo_config.patch(v.get("dcfg", {})):
                b = loaded[v["name"]] = load_backend(config)
        finally:
            compiled.INDUCTOR_OPTIONS.clear()
            compiled.INDUCTOR_OPTIONS.update(saved)
        print(f"{v['name']}: loaded in {time.perf_counter() - t0:.1f} s ({b.compile_status})", flush=True)
    fused._realized_fp32 = materialize
    int8_as_parameters(False)
    tokenizer = next(b for b in loaded.values() if b.name != "llamacpp").tokenizer
    ids = prompt_ids(tokenizer, max(contexts))

    for b in loaded.values():  # warm-up
        decode_rate(b, ids[: min(contexts)], 4)
    times = {(name, c): [] for name in loaded for c in contexts}
    for _ in range(rounds):
        for c in contexts:
            for name, b in loaded.items():  # bench decode's own timing: prefill c tokens, 24 greedy steps
                times[(name, c)].append(1000 / decode_rate(b, ids[:c], 24))
    for c in contexts:
        for name in loaded:
            xs = times[(name, c)]
            print(f"ctx {c:5d}  {name:24s} best {min(xs):6.2f} ms  median {statistics.median(xs):6.2f} ms"
                  f"  ({1000 / min(xs):6.1f} tok/s)")


if __name__ == "__main__":
    main()

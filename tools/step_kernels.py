"""Where a compiled decode step's time goes: inductor's per-kernel profile (docs/decode.md).

Loads the default model with ``--compile on`` (and ``--quant``), prefills C tokens, times 3 x 20 greedy steps
(best round), then profiles 20 steps with ``torch._inductor.config.cpp.enable_kernel_profile`` and prints ms per
token per generated kernel and per Python-side item (Dynamo's pre-graph bytecode, the wrapper call).

    python tools/step_kernels.py int8 1024
"""

import sys
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import profile

from fmchat.bench.decode import _prefill, prompt_ids
from fmchat.config import RunConfig
from fmchat.conversation import load_backend
from fmchat.engine.session import set_threads


def main() -> None:
    quant, context = sys.argv[1], int(sys.argv[2])
    inductor_config.cpp.enable_kernel_profile = True
    set_threads(None)
    b = load_backend(RunConfig(device="cpu", dtype="bfloat16", ctx=context + 200, compile="on", quant=quant))
    print(b.compile_status)
    ids = prompt_ids(b.tokenizer, context)

    def step(logits):
        return b.forward([int(torch.argmax(torch.as_tensor(logits)))])

    with torch.inference_mode():
        b.truncate(0)
        logits = _prefill(b, ids)
        for _ in range(5):
            logits = step(logits)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                logits = step(logits)
            best = min(best, (time.perf_counter() - t0) / 20)
        print(f"{best * 1000:.2f} ms per token (best of 3 x 20 steps, no profiler)")
        with profile() as prof:
            for _ in range(20):
                logits = step(logits)
    per_token: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key if not event.key.startswith("graph_") else "kernel " + event.key[-40:]
        per_token[name] = per_token.get(name, 0.0) + event.self_cpu_time_total / 20 / 1000
    for name, ms in sorted(per_token.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{ms:8.3f} ms per token  {name}")


if __name__ == "__main__":
    main()

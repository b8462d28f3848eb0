"""How fast inductor's one-row int8 GEMVs stream SmolLM2-135M's weights (docs/decode.md).

All 211 int8 matrices of the model (30 layers x q, k, v, o, gate, up, down, plus the 49152 x 576 head), one input
row each, compiled into one function; prints ms per call and GB/s of int8 weights read, for each formulation,
and the machine's read rate (``sum`` over 512 MiB) for reference.

    python tools/int8_gemv_rate.py fmchat,rows2,rows4
"""

import sys
import time

import torch
import torch._inductor.config as inductor_config

from fmchat.bench.decode import read_rate_gb_s
from fmchat_kernels.quant import int8_gemv


def rows(r):  # r output rows per step of the outer loop
    def gemv(x, w, s):
        n, k = w.shape
        y = (x.float().view(1, 1, k) * w.view(n // r, r, k).float()).sum(-1).reshape(n) * s
        return y.to(torch.bfloat16)
    return gemv


FORMS = {"fmchat": int8_gemv, "rows2": rows(2), "rows4": rows(4), "rows8": rows(8)}


def main() -> None:
    torch.manual_seed(0)
    inductor_config.realize_opcount_threshold = 10  # as fmchat's compiled step
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    shapes = layer * 30 + [(49152, 576)]
    ws = [torch.randint(-127, 128, s, dtype=torch.int8) for s in shapes]
    ss = [torch.rand(s[0]) for s in shapes]
    xs = [torch.randn(1, s[1], dtype=torch.bfloat16) for s in shapes]
    nbytes = sum(w.numel() for w in ws)
    for name in sys.argv[1].split(","):
        form = FORMS[name]
        f = torch.compile(lambda xs, ws, ss, form=form: [form(x, w, s) for x, w, s in zip(xs, ws, ss)], fullgraph=True)
        with torch.inference_mode():
            f(xs, ws, ss)
            best = float("inf")
            for _ in range(30):
                t0 = time.perf_counter()
                f(xs, ws, ss)
                best = min(best, time.perf_counter() - t0)
        print(f"{name:8s} {best * 1000:6.2f} ms  {nbytes / best / 1e9:5.1f} GB/s of int8 weights", flush=True)
    print(f"read rate (bench decode's: sum over 512 MiB): {read_rate_gb_s():.1f} GB/s")


if __name__ == "__main__":
    main()

"""Formulations of one-token decode attention compiled by inductor, timed for 30 layers (docs/decode.md).

SmolLM2-135M's layout: 9 query / 3 kv heads x 64, bf16 cache; the fill is a symbolic size (one graph for every
length), as in fmchat's compiled step. Prints ms per call for all 30 layers at 128 / 1024 / 4096 cached tokens and
the largest difference from ``decode_attention_fused`` run eagerly (the form fmchat uses).

    python tools/decode_attention_forms.py fused,bmm,keys_inner,per_kv_head,manual_softmax
"""

import sys
import time

import torch
import torch._inductor.config as inductor_config

from fmchat_kernels.attention.fused import _realized_fp32 as materialize
from fmchat_kernels.attention.fused import decode_attention_fused

LAYERS, HQ, HKV, D, LMAX = 30, 9, 3, 64, 4200
G = HQ // HKV


def bmm(q, k, v, s):
    p = torch.softmax(torch.bmm(q.reshape(HKV, G, D), k.transpose(1, 2)).float() * s, -1)
    return torch.bmm(p.to(v.dtype), v).reshape(1, 1, HQ, D)


def keys_inner(q, k, v, s):  # reduce over D with the keys contiguous in the scores
    qh = materialize(q).reshape(HKV, G, D, 1)
    p = torch.softmax((qh * k.float().transpose(1, 2).unsqueeze(1)).sum(2) * s, -1)
    return (p.unsqueeze(-1) * v.unsqueeze(1).float()).sum(2).to(q.dtype).reshape(1, 1, HQ, D)


def per_kv_head(q, k, v, s):  # scores [HKV, L, G]: the query heads of one kv head together
    qh = materialize(q).reshape(HKV, 1, G, D)
    p = torch.softmax((qh * k.float().unsqueeze(2)).sum(-1) * s, 1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(1).to(q.dtype).reshape(1, 1, HQ, D)


def manual_softmax(q, k, v, s):
    L = k.shape[1]
    qh = (materialize(q) * s).reshape(HQ, 1, D)
    kh = k.unsqueeze(1).expand(HKV, G, L, D).reshape(HQ, L, D)
    vh = v.unsqueeze(1).expand(HKV, G, L, D).reshape(HQ, L, D)
    sc = (qh * kh.float()).sum(-1)
    e = (sc - sc.amax(-1, keepdim=True)).exp()
    out = (e.unsqueeze(-1) * vh.float()).sum(1) / e.sum(-1).unsqueeze(-1)
    return out.to(q.dtype).reshape(1, 1, HQ, D)


FORMS = {"fused": decode_attention_fused, "bmm": bmm, "keys_inner": keys_inner, "per_kv_head": per_kv_head,
         "manual_softmax": manual_softmax}


def all_layers(form):
    def f(qs, ks, vs, n):
        return [form(q, k[:, :n], v[:, :n], 0.125) for q, k, v in zip(qs, ks, vs)]
    return f


def main() -> None:
    torch.manual_seed(0)
    inductor_config.realize_opcount_threshold = 10  # as fmchat's compiled step
    ks = [torch.randn(HKV, LMAX, D, dtype=torch.bfloat16) for _ in range(LAYERS)]
    vs = [torch.randn(HKV, LMAX, D, dtype=torch.bfloat16) for _ in range(LAYERS)]
    qs = [torch.randn(1, HQ, 1, D, dtype=torch.bfloat16) for _ in range(LAYERS)]
    for t in ks + vs + qs:
        torch._dynamo.mark_static(t)
    for name in sys.argv[1].split(","):
        f = torch.compile(all_layers(FORMS[name]), fullgraph=True, dynamic=True)
        with torch.inference_mode():
            for n in (128, 1024, 4096):
                f(qs, ks, vs, n + 1)
                best = float("inf")
                for _ in range(20):
                    t0 = time.perf_counter()
                    out = f(qs, ks, vs, n)
                    best = min(best, time.perf_counter() - t0)
                ref = all_layers(decode_attention_fused)(qs, ks, vs, n)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
                print(f"{name:15s} {n:5d} tokens  {best * 1000:6.2f} ms (30 layers)  max diff vs eager fused {err:.3g}", flush=True)


if __name__ == "__main__":
    main()

"""``log8``: one signed byte per weight on a per-channel logarithmic grid, decoded on the fly in the matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import QuantizedLinear, row_chunks

LOG8_RANGES = (4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0)  # candidate log2 ranges (octaves) per channel
LOG8_SEARCH_COLS = 128  # columns per row on which the log range is chosen
LOG8_CHUNK_ELEMS = 1 << 21  # rows decoded at a time in the log8 matmul: at most this many weights


def _log8_encode(w: torch.Tensor, octaves: torch.Tensor):
    """Codes for rows of ``w`` given each row's log range ``octaves`` [N]: returns (codes int8, lo, step)."""
    a = w.abs()
    hi = torch.log2(a.amax(dim=1).clamp_min(1e-30))
    lo = hi - octaves
    step = octaves / 126.0
    la = torch.log2(a.clamp_min(1e-38))
    pos = ((la - lo[:, None]) / step[:, None]).clamp_(min=-1.0, max=126.0)  # (m - 1) as a real number
    f = torch.floor(pos)
    v_lo = torch.where(f < 0, torch.zeros_like(a), torch.exp2(lo[:, None] + f * step[:, None]))
    v_hi = torch.exp2(lo[:, None] + torch.clamp(f + 1, max=126.0) * step[:, None])
    m = torch.where(a - v_lo > v_hi - a, f + 1, f).clamp_(-1, 126) + 1  # nearest in the linear domain
    codes = (torch.sign(w) * m).to(torch.int8)
    return codes, lo, step


def _log8_decode(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    c = codes.to(torch.float32)
    v = torch.exp2(torch.addcmul((lo - step)[..., None], c.abs(), step[..., None]))
    return (v * torch.sign(c)).to(dtype)  # sign(0) = 0: code 0 is an exact zero


class Log8Linear(QuantizedLinear):
    scheme = "log8"

    def __init__(self, in_features, out_features, bias=None, compute_dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("log_lo", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("log_step", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight, bias=None, compute_dtype=torch.float32) -> Log8Linear:
        n, k = weight.shape
        m = cls(k, n, bias, compute_dtype, device=weight.device)
        if weight.device.type == "meta":  # the layer's structure only (shapes, dtypes), no values to compute
            return m
        cols = torch.arange(0, k, max(1, k // LOG8_SEARCH_COLS), device=weight.device)
        with torch.no_grad():
            for rows in row_chunks(n, k):  # float32 copies of one chunk of rows at a time
                w = weight[rows].detach().float()
                r = w.shape[0]
                # Per channel, pick the log range with the least squared error, judged on a column sample (plus
                # each row's largest weight, which fixes the top of the range), then encode the full rows once.
                sample = torch.cat([w[:, cols], w.gather(1, w.abs().argmax(dim=1, keepdim=True))], dim=1)
                best_err = torch.full((r,), float("inf"), device=w.device)
                best = torch.full((r,), LOG8_RANGES[0], device=w.device)
                for span in LOG8_RANGES:
                    octaves = torch.full((r,), span, device=w.device)
                    err = (_log8_decode(*_log8_encode(sample, octaves)) - sample).pow(2).sum(dim=1)
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = torch.where(better, octaves, best)
                codes, lo, step = _log8_encode(w, best)
                m.codes[rows] = codes
                m.log_lo[rows] = lo
                m.log_step[rows] = step
        return m

    def rows(self, ids: torch.Tensor, dtype) -> torch.Tensor:
        return _log8_decode(self.codes[ids], self.log_lo[ids], self.log_step[ids], dtype)

    def _mm(self, x2):
        rows = max(1, LOG8_CHUNK_ELEMS // self.in_features)
        if rows >= self.out_features:
            return F.linear(x2, _log8_decode(self.codes, self.log_lo, self.log_step, x2.dtype))
        out = []
        for i in range(0, self.out_features, rows):
            sl = slice(i, i + rows)
            out.append(F.linear(x2, _log8_decode(self.codes[sl], self.log_lo[sl], self.log_step[sl], x2.dtype)))
        return torch.cat(out, dim=-1)

    def dequantize(self):
        return _log8_decode(self.codes, self.log_lo, self.log_step)

"""Moving cached keys to new positions: the math behind the `shift` policy.

Cached keys are stored after RoPE: k_p = R(p)·k, where R rotates each pair of dimensions
(x_i, x_{i+r/2}) by the angle p·inv_freq_i ("rotate_half" layout, as in Llama, Qwen2 and Phi-3).
Rotations compose, R(p - d) = R(-d)·R(p), so moving a cached key back by d positions is one more
rotation by -d — exact for any RoPE whose inv_freq does not depend on the sequence length
(default, linear, llama3, yarn; longrope while the window stays within its original length).
Dynamic-NTK scaling changes inv_freq with the length, so there the math does not allow a shift.
"""

from __future__ import annotations

import torch

SHIFTABLE_ROPE = {"default", "linear", "llama3", "yarn"}


def rope_inv_freq(model) -> tuple[torch.Tensor | None, str]:
    """(inv_freq, reason): the frequencies cached keys were rotated with, or None and why a shift is not exact."""
    config = model.config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None, "the model has no rotary embedding fmchat can read"
    if rope_type == "longrope":
        original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            return None, "longrope without original_max_position_embeddings"
        return (getattr(rotary, "original_inv_freq", rotary.inv_freq), "longrope (short factors, window within the original length)")
    if rope_type not in SHIFTABLE_ROPE:
        return None, f"RoPE type '{rope_type}' changes its frequencies with the sequence length"
    return rotary.inv_freq, rope_type


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [..., S, D] rotated by ``delta`` positions (negative moves them back), computed in fp32.

    Only the first ``2 * len(inv_freq)`` dimensions are rotary (partial rotary embeddings keep the rest).
    """
    r = inv_freq.numel() * 2
    k = keys.float()
    angle = torch.as_tensor(delta, dtype=torch.float32, device=keys.device) * inv_freq.to(keys.device, torch.float32)
    cos, sin = angle.cos(), angle.sin()
    x1, x2, rest = k[..., : r // 2], k[..., r // 2 : r], k[..., r:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
    return out.to(keys.dtype)


def shift_kv(keys: torch.Tensor, values: torch.Tensor, n_keep: int, n_discard: int, inv_freq: torch.Tensor):
    """Drop cached positions [n_keep, n_keep + n_discard) of [B, H, S, D] keys/values; rotate the later keys back."""
    tail = n_keep + n_discard
    k = torch.cat((keys[..., :n_keep, :], rotate_keys(keys[..., tail:, :], -n_discard, inv_freq)), dim=-2)
    v = torch.cat((values[..., :n_keep, :], values[..., tail:, :]), dim=-2)
    return k, v

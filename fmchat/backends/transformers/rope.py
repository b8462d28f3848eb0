"""Moving cached keys to new positions: the math behind the `shift` policy.

Cached keys are stored after RoPE: k_p = R(p)·k, where R rotates pairs of dimensions by the angle p·inv_freq_i.
Rotations compose, R(p - d) = R(-d)·R(p), so moving a cached key back by d positions is one more rotation by -d —
exact for any RoPE whose inv_freq does not depend on the sequence length (default, linear, llama3, yarn; longrope
while the window stays within its original length; yarn's attention factor scales cos and sin alike, so the extra
rotation keeps it). Dynamic-NTK scaling changes inv_freq with the length, so there the math does not allow a shift.

Each decoder layer is moved with its own RoPE (``layer_ropes``):

* hybrid models (Gemma 3, Cohere 2, OLMo 3, ...) give each layer type ("sliding_attention", "full_attention") its own
  rope parameters — base, scaling — read from ``config.rope_parameters[layer_type]`` and the rotary module's
  ``{layer_type}_inv_freq`` buffer;
* layers without RoPE (Cohere 2's global layers, SmolLM3 and Llama 4 layers with ``use_rope`` off) keep their keys
  as they are: only the discarded cells go;
* the pairing is read from the model's own rotary module, not assumed: "half" pairs (x_i, x_{i+r/2}) (Llama, Qwen2,
  Phi-3, Gemma) and "interleaved" pairs (x_{2i}, x_{2i+1}) (Cohere); anything else is refused;
* only the first ``2 * len(inv_freq)`` dimensions rotate (partial rotary embeddings keep the rest).

Which cells hold which positions is the backend's business (``shift_cells`` takes the position of the first cell):
a sliding-window cache layer may hold only its last W - 1 positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHIFTABLE_ROPE = {"default", "linear", "llama3", "yarn"}
# Model types whose global (non-sliding) layers apply no RoPE although the model has a rotary embedding.
NOPE_GLOBAL_LAYERS = {"cohere2"}


@dataclass(frozen=True)
class LayerRope:
    """How one layer's cached keys were rotated: ``inv_freq`` None means no RoPE (its keys do not move)."""

    inv_freq: torch.Tensor | None
    kind: str  # "default", "linear", "llama3", "yarn", "longrope" or "none"
    layout: str = "half"  # "half" or "interleaved"
    layer_type: str | None = None


def text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def decoder(model):
    """The decoder stack (the module holding ``layers`` and ``rotary_emb``)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):  # a multimodal wrapper (e.g. Gemma3ForConditionalGeneration): its text model
        inner = getattr(inner, "language_model", inner)
    return inner


def layer_ropes(model, ctx_size: int | None = None) -> list[LayerRope] | str:
    """Per decoder layer, the RoPE its cached keys carry; or why moving them is not exact."""
    cfg = text_config(model)
    stack = decoder(model)
    layers = getattr(stack, "layers", None)
    rotary = getattr(stack, "rotary_emb", None)
    if layers is None or rotary is None:
        return "the model has no rotary embedding fmchat can read"
    types = list(getattr(cfg, "layer_types", None) or [None] * len(layers))
    if len(types) != len(layers):
        return f"{len(types)} layer types for {len(layers)} layers"
    by_type: dict[str | None, LayerRope | str] = {}
    out = []
    for layer, layer_type in zip(layers, types):
        attn = getattr(layer, "self_attn", None)
        nope = not getattr(attn, "use_rope", True) or (
            getattr(cfg, "model_type", None) in NOPE_GLOBAL_LAYERS and layer_type != "sliding_attention"
        )
        if nope:
            out.append(LayerRope(None, "none", layer_type=layer_type))
            continue
        if layer_type not in by_type:
            by_type[layer_type] = _type_rope(cfg, rotary, layer_type, ctx_size)
        rope = by_type[layer_type]
        if isinstance(rope, str):
            return rope
        out.append(rope)
    return out


def _type_rope(cfg, rotary, layer_type: str | None, ctx_size: int | None) -> LayerRope | str:
    """The RoPE of one layer type (or of every layer, for models with one RoPE)."""
    per_type = layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq")
    prefix = f"{layer_type}_" if per_type else ""
    on = f" on {layer_type} layers" if per_type else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        return "the model has no rotary embedding fmchat can read"
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "longrope":
        original = getattr(cfg, "original_max_position_embeddings", None)
        if original is None:
            return f"longrope{on} without original_max_position_embeddings"
        if ctx_size is not None and ctx_size > original:
            return f"longrope switches frequencies past {original} tokens and this window is {ctx_size}"
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq", inv_freq)
    elif rope_type not in SHIFTABLE_ROPE:
        return f"RoPE type '{rope_type}'{on} changes its frequencies with the sequence length"
    scaling = getattr(rotary, f"{prefix}attention_scaling", 1.0)
    layout = _layout(rotary, layer_type if per_type else None, inv_freq, scaling)
    if layout is None:
        return f"the rotary embedding{on} pairs its dimensions in a way fmchat does not know"
    return LayerRope(inv_freq, rope_type, layout, layer_type)


def _layout(rotary, layer_type: str | None, inv_freq: torch.Tensor, scaling) -> str | None:
    """Which dimensions the model's rotary module pairs: compare its cos at one position with both layouts."""
    pos = 7  # any position > 0 where cos(pos * inv_freq) differs between the frequencies
    x = torch.zeros(1, 1, 1, dtype=torch.float32, device=inv_freq.device)
    ids = torch.tensor([[pos]], device=inv_freq.device)
    try:
        with torch.no_grad():
            cos, _ = rotary(x, ids, layer_type) if layer_type is not None else rotary(x, ids)
    except Exception:  # noqa: BLE001 - an unknown rotary module: refuse rather than guess
        return None
    cos = cos.reshape(-1).float()
    base = (pos * inv_freq.float()).cos() * float(scaling)
    layouts = {"half": torch.cat((base, base)), "interleaved": torch.repeat_interleave(base, 2)}
    for name, expected in layouts.items():
        if cos.shape == expected.shape and torch.allclose(cos, expected, atol=1e-5, rtol=1e-5):
            return name
    return None


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor, layout: str = "half"):
    """Keys [..., S, D] rotated by ``delta`` positions (negative moves them back), computed in fp32.

    Only the first ``2 * len(inv_freq)`` dimensions are rotary (partial rotary embeddings keep the rest).
    """
    r = inv_freq.numel() * 2
    k = keys.float()
    angle = torch.as_tensor(delta, dtype=torch.float32, device=keys.device) * inv_freq.to(keys.device, torch.float32)
    cos, sin = angle.cos(), angle.sin()
    rot, rest = k[..., :r], k[..., r:]
    if layout == "interleaved":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1).to(keys.dtype)


def shift_cells(keys: torch.Tensor, values: torch.Tensor, first: int, n_keep: int, n_discard: int, rope: LayerRope):
    """[B, H, L, D] keys/values whose cells hold positions [first, first + L): drop positions
    [n_keep, n_keep + n_discard) and rotate the later keys back by ``n_discard`` (NoPE keys stay as they are)."""
    length = keys.shape[-2]
    a = min(max(n_keep - first, 0), length)
    b = min(max(n_keep + n_discard - first, 0), length)
    tail = keys[..., b:, :]
    if rope.inv_freq is not None:
        tail = rotate_keys(tail, -n_discard, rope.inv_freq, rope.layout)
    k = torch.cat((keys[..., :a, :], tail), dim=-2)
    v = torch.cat((values[..., :a, :], values[..., b:, :]), dim=-2)
    return k, v

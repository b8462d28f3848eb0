"""The PyTorch/transformers backend, as a package: ``backend`` (load, render, forward, cache surgery),
``gguf`` (GGUF -> safetensors conversion), ``fmc`` (fmchat's preallocated KV cache and attention function),
``compiled`` (the compiled one-token decode step), ``rope`` (RoPE re-rotation for the shift policy).

Importing this package registers its attention kernels, quantizations and decode paths; it does not import
torch (the backend module does, when a chat loads it).
"""

from __future__ import annotations

from fmchat import registry

registry.KERNELS.add("sdpa", "sdpa (PyTorch scaled_dot_product_attention)")
registry.KERNELS.add("eager", "eager (transformers' reference attention)")
registry.KERNELS.add("fmc", "fmc (fmchat's attention over a preallocated KV cache)")

registry.QUANTS.add("none", "none (the model's weights at the chosen dtype)")
# "cast": the whole model at another dtype; "integer": weight-only codes, quantized from the float32 originals
registry.QUANTS.add("bf16", "bf16 (bfloat16 weights)", capabilities={"cast"})
registry.QUANTS.add("fp16", "fp16 (float16 weights)", capabilities={"cast"})
registry.QUANTS.add("int8", "int8 (per-channel, weight-only)", capabilities={"integer"})
registry.QUANTS.add("int4", "int4 (groups of 32, weight-only)", capabilities={"integer"})
registry.QUANTS.add("log8", "log8 (8-bit logarithmic, weight-only)", capabilities={"integer"})

# The decode path (``--compile``; compiled.py, compile_cache.py, docs/decode.md). "off" and "on" are the names
# before "auto" existed, kept so that saved settings files and scripts keep working (capability "alias": the
# settings pane need not offer them twice).
registry.DECODE_PATHS.add("auto", "auto (the compiled step where it works here: compiled once per machine in the "
                          "background and cached, eager meanwhile)")  # fmt: skip
registry.DECODE_PATHS.add("eager", "eager (one PyTorch call per op)")
registry.DECODE_PATHS.add("compiled", "compiled (torch.compile the one-token step at load, cached; falls back to eager and says why)")
registry.DECODE_PATHS.add("off", "off (= eager)", capabilities={"alias", "alias-of:eager"})
registry.DECODE_PATHS.add("on", "on (= compiled)", capabilities={"alias", "alias-of:compiled"})


def __getattr__(name: str):
    if name == "TransformersBackend":
        from .backend import TransformersBackend

        return TransformersBackend
    raise AttributeError(name)

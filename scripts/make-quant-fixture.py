#!/usr/bin/env python3
"""Make tests/fixtures/quant/blocks.safetensors with gguf-py (an independent
implementation of the GGML block formats): for each type, random raw blocks (`<T>.raw`,
u8, with finite f16 scales) and gguf-py's dequantisation of them (`<T>.f32`).

Run with the peer venv: benches/peers/.venv/bin/python scripts/make-quant-fixture.py
"""
import os
import sys

import numpy as np
from gguf.quants import dequantize
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

rng = np.random.default_rng(2026)
out = {}
# (type, elements per block, bytes per block, byte offsets of f16 scales)
for name, qt, blocks, scale_at in [
    ("Q8_0", T.Q8_0, 8, [0]), ("Q4_0", T.Q4_0, 8, [0]), ("Q4_1", T.Q4_1, 8, [0, 2]),
    ("Q4_K", T.Q4_K, 3, [0, 2]), ("Q6_K", T.Q6_K, 3, [208]),
    ("F16", T.F16, 64, None), ("BF16", T.BF16, 64, None),
]:
    from gguf.constants import GGML_QUANT_SIZES
    elems, nbytes = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(blocks, nbytes), dtype=np.uint8)
    if scale_at is not None:
        for off in scale_at:
            scales = rng.uniform(-0.05, 0.05, size=blocks).astype(np.float16)
            raw[:, off:off + 2] = scales.view(np.uint8).reshape(blocks, 2)
    else:
        vals = rng.standard_normal(blocks).astype(np.float32)
        if qt == T.F16:
            raw = vals.astype(np.float16).view(np.uint8).reshape(blocks, 2)
        else:
            raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(blocks, 2)
    deq = dequantize(raw.reshape(1, -1), qt).astype(np.float32).reshape(-1)
    assert deq.size == blocks * elems and np.isfinite(deq).all(), name
    out[f"{name}.raw"] = raw.reshape(-1)
    out[f"{name}.f32"] = deq
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "quant", "blocks.safetensors")
save_file(out, path, metadata={"made_by": "gguf-py " + __import__("importlib.metadata").metadata.version("gguf")})
print("wrote", os.path.normpath(path), file=sys.stderr)

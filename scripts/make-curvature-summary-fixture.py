#!/usr/bin/env python3
"""Make tests/fixtures/curvature-summary.json: the numbers of `curvature`'s summary
(src/curvature/summary.rs), computed with numpy in float64 from the reference curvature of
the tiny GQA fixture (tests/fixtures/tiny-gqa/expected.safetensors: `diag_ef.*` from
PyTorch's per-sequence loop, `kfac_in.*` / `kfac_out.*` from curvlinops;
kfac_extra.safetensors: the kfac-tri cross factors), so that tests/curvature_summary.rs
can hold the engine's printed summary to values it did not compute.

Definitions (the summary's doc comments; DESIGN section 5 for the matrices), per adapted
module, A block and B block:
- diag: the block is diag(F); trace = sum F, max = max |F| over both blocks, zero share =
  exactly-zero entries of F over both blocks / (|A| + |B|), entries = |A| + |B|.
- kfac / kfac-tri: the block is F = C (x) G in column-stacking vec order, formed here
  with np.kron (not the engine's shortcuts): trace = tr F, max = max |F|, zero share =
  exactly-zero entries of the two Kronecker products / (n_A^2 + n_B^2), entries =
  n_A^2 + n_B^2 (n_A = r d_in, n_B = d_out r). The cross block is not in these.
- kfac-tri: the joint matrix [[C_A (x) G_A, K], [K^T, C_B (x) G_B]] with
  K = C_AB (x) G_AB, whose quadratic form is the penalty's
  tr(DA^T G_A DA C_A) + tr(DB^T G_B DB C_B) + 2 tr(DA^T G_AB DB C_AB^T) (checked here on
  random D); its smallest and largest eigenvalue (numpy.linalg.eigvalsh) and its
  Frobenius norm (which bounds how far f32 factor errors move an eigenvalue: Weyl).
- per layer (the printed table): traces summed over the layer's modules, max the largest,
  zero share the layer's zero entries over its entries, eig the smallest min/max
  eigenvalue ratio of its modules (the ratio's denominator is |max|).
- the kfac-tri note: how many modules have ratio < -1e-5, and the worst ratio.
- fresh_init: at PEFT's init B = 0, so the gradient w.r.t. A, hence A's curvature, is
  exactly zero in every scheme, and B's is not (generic data): the zero shares follow from
  the shapes alone (diag |A| / (|A| + |B|), kfac n_A^2 / (n_A^2 + n_B^2), the layer's as
  the sums).

Run with the peer venv:
benches/peers/.venv/bin/python scripts/make-curvature-summary-fixture.py
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tests", "fixtures", "tiny-gqa")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "curvature-summary.json")
PROJS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
         ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
         ("mlp", "down_proj")]
NEGATIVE_TOL = 1e-5

cfg = json.load(open(os.path.join(TINY, "model", "config.json")))
r = json.load(open(os.path.join(TINY, "adapter", "adapter_config.json")))["r"]
exp = {k: v.astype(np.float64) for k, v in load_file(os.path.join(TINY, "expected.safetensors")).items()}
extra = {k: v.astype(np.float64) for k, v in load_file(os.path.join(TINY, "kfac_extra.safetensors")).items()}
h, inter = cfg["hidden_size"], cfg["intermediate_size"]
kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
modules = [(layer, f"layers.{layer}.{p}.{q}", q) for layer in range(cfg["num_hidden_layers"])
           for p, q in PROJS]
rng = np.random.default_rng(7)


def peft(name):
    return "base_model.model.model." + name


def diag_module(name):
    fa = exp[f"diag_ef.{peft(name)}.lora_A.weight"]
    fb = exp[f"diag_ef.{peft(name)}.lora_B.weight"]
    both = np.concatenate([fa.ravel(), fb.ravel()])
    return {"trace_a": fa.sum(), "trace_b": fb.sum(), "max": np.abs(both).max(),
            "zeros": int((both == 0).sum()), "entries": both.size}


def factors(name):
    """C_A, G_A, C_B, G_B of a module (curvlinops, expand)."""
    return tuple(exp[f"kfac_{side}.{peft(name)}.lora_{t}"]
                 for t in "AB" for side in ("in", "out"))


def kfac_module(name, tri):
    ca, ga, cb, gb = factors(name)
    fa, fb = np.kron(ca, ga), np.kron(cb, gb)
    both = np.concatenate([fa.ravel(), fb.ravel()])
    s = {"trace_a": np.trace(fa), "trace_b": np.trace(fb), "max": np.abs(both).max(),
         "zeros": int((both == 0).sum()), "entries": both.size}
    if tri:
        cab, gab = extra[f"kfac_cross_in.{peft(name)}"], extra[f"kfac_cross_out.{peft(name)}"]
        k = np.kron(cab, gab)
        na, nb = fa.shape[0], fb.shape[0]
        assert k.shape == (na, nb)
        f = np.block([[fa, k], [k.T, fb]])
        # The assembled matrix's quadratic form is DESIGN's penalty (vec column-stacking).
        din, dout = ca.shape[0], gb.shape[0]
        da, db = rng.standard_normal((r, din)), rng.standard_normal((dout, r))
        v = np.concatenate([da.ravel(order="F"), db.ravel(order="F")])
        q = (np.trace(da.T @ ga @ da @ ca) + np.trace(db.T @ gb @ db @ cb)
             + 2 * np.trace(da.T @ gab @ db @ cab.T))
        assert abs(v @ f @ v - q) <= 1e-9 * abs(q), (name, v @ f @ v, q)
        ev = np.linalg.eigvalsh(f)
        s.update(min_eigenvalue=ev[0], max_eigenvalue=ev[-1], frobenius=np.linalg.norm(f))
    return s


def finish(ms):
    """Zero shares, per-layer rows, JSON-ready floats."""
    out = {"modules": {}, "layers": {}}
    layers = {}
    for layer, name, _ in modules:
        m = dict(ms[name])
        layers.setdefault(str(layer), []).append(m)
        m["zero_share"] = m["zeros"] / m["entries"]
        out["modules"][name] = {k: float(v) if isinstance(v, (float, np.floating)) else v
                                for k, v in m.items()}
    for layer, rows in layers.items():
        row = {"trace_a": sum(m["trace_a"] for m in rows),
               "trace_b": sum(m["trace_b"] for m in rows),
               "max": max(m["max"] for m in rows),
               "zero_share": sum(m["zeros"] for m in rows) / sum(m["entries"] for m in rows)}
        ratios = [m["min_eigenvalue"] / abs(m["max_eigenvalue"]) for m in rows if "min_eigenvalue" in m]
        if ratios:
            row["min_max_eig"] = min(ratios)
        out["layers"][layer] = {k: float(v) for k, v in row.items()}
    ratios = [m["min_eigenvalue"] / abs(m["max_eigenvalue"]) for m in ms.values() if "min_eigenvalue" in m]
    if ratios:
        out["negative"] = int(sum(q < -NEGATIVE_TOL for q in ratios))
        out["worst"] = float(min(ratios))
    return out


def fresh(scheme):
    ms = {}
    for _, name, q in modules:
        din, dout = dims[q]
        na, nb = r * din, dout * r
        if scheme == "diag":
            ms[name] = {"zeros": na, "entries": na + nb}
        else:
            ms[name] = {"zeros": na * na, "entries": na * na + nb * nb}
    out = {"modules": {}, "layers": {}}
    for layer, name, _ in modules:
        out["modules"][name] = ms[name]["zeros"] / ms[name]["entries"]
    for layer in range(cfg["num_hidden_layers"]):
        rows = [ms[n] for l, n, _ in modules if l == layer]
        out["layers"][str(layer)] = sum(m["zeros"] for m in rows) / sum(m["entries"] for m in rows)
    return out


fixture = {
    "made_by": "scripts/make-curvature-summary-fixture.py (numpy " + np.__version__ + ")",
    "r": r,
    "diag": finish({n: diag_module(n) for _, n, _ in modules}),
    "kfac": finish({n: kfac_module(n, False) for _, n, _ in modules}),
    "kfac-tri": finish({n: kfac_module(n, True) for _, n, _ in modules}),
    "fresh_init": {"diag": fresh("diag"), "kfac": fresh("kfac")},
}
with open(OUT, "w") as f:
    json.dump(fixture, f, indent=1, sort_keys=True)
    f.write("\n")
print("wrote", os.path.normpath(OUT), file=sys.stderr)

#!/usr/bin/env bash
# Side by side, in one run: the engine's curvature passes (criterion) and the peers
# (PyTorch per-sequence loop and BackPACK for diag, curvlinops for KFAC) on the same
# model, batch and threads; prints seconds per batch and ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
benches/peers/setup-venv.sh
cargo bench --bench curvature -- --warm-up-time 3 --measurement-time 20 2>&1 | grep -E "time:|Benchmarking .*: Analyzing"
peer=$(cd benches/peers && .venv/bin/python torch_curvature.py 2>/dev/null | tail -1)
echo "$peer"
python3 - "$peer" <<'PY'
import json, sys
peer = json.loads(sys.argv[1])
est = lambda b: json.load(open(f"target/criterion/smollm2_curvature/{b}/new/estimates.json"))["median"]["point_estimate"] / 1e9
base = est("lora_forward_backward")
print(f"{'engine':28} {'s/batch':>8} {'vs fwd+bwd':>11}")
for b in ["lora_forward_backward", "diag", "kfac_expand", "kfac_reduce", "kfac_tri"]:
    print(f"{b:28} {est(b):8.3f} {est(b)/base:10.2f}x")
print(f"\n{'peer':28} {'s/batch':>8} {'engine speed-up':>16}")
for k, ours in [("lora_forward_backward_s", "lora_forward_backward"), ("diag_loop_s", "diag"), ("diag_backpack_s", "diag"), ("kfac_curvlinops_s", "kfac_expand")]:
    if k in peer:
        print(f"{k[:-2]:28} {peer[k]:8.3f} {peer[k]/est(ours):15.2f}x")
    else:
        print(f"{k[:-2]:28} not measured: {peer.get(k[:-2] + '_error', '?')}")
PY

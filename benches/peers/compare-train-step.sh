#!/usr/bin/env bash
# Side by side, in one run: the engine's LoRA forward+backward (criterion) and PyTorch +
# PEFT on the same model, batch and threads; prints both and their ratio.
#
# --avx2: both sides as an AVX2-only machine runs them, on an AVX-512 one: the engine
# without its `avx512` feature (the GEMM's AVX2 kernels), PyTorch with
# ATEN_CPU_CAPABILITY=avx2 (oneDNN/MKL follow its dispatch cap below).
# --interleaved: instead of criterion then the peer, one engine pass and one peer pass per
# round, back to back (benches/peers/interleaved.py): the figures to go by on a machine
# whose speed drifts.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
features=()
interleaved=0
for arg in "$@"; do
  case $arg in
    --avx2)
      features=(--no-default-features)
      export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ;;
    --interleaved) interleaved=1 ;;
    *) echo "compare-train-step.sh: unknown option $arg (--avx2, --interleaved)" >&2; exit 2 ;;
  esac
done
benches/peers/setup-venv.sh
if [ $interleaved = 1 ]; then
  cargo bench "${features[@]}" --bench train_step --no-run
  exec benches/peers/.venv/bin/python benches/peers/interleaved.py -- \
    cargo bench --quiet "${features[@]}" --bench train_step -- --serve
fi
cargo bench "${features[@]}" --bench train_step -- --warm-up-time 5 --measurement-time 40 2>&1 |
  grep -E "bench backend|loss_sum|products:|time:|thrpt:"
peer=$(benches/peers/.venv/bin/python benches/peers/torch_peft_step.py 2>/dev/null | tail -1)
echo "$peer"
python3 - "$peer" <<'PY'
import json, sys
peer = json.loads(sys.argv[1])
est = lambda b: json.load(open(f"target/criterion/smollm2_lora_step/{b}/new/estimates.json"))["median"]["point_estimate"] / 1e9
ours = {"forward_backward": est("forward_backward_cpu"), "forward": est("forward_only_cpu")}
tokens = peer["batch"] * peer["seq"]
print(f"peer: {peer['peer']}, CPU capability {peer.get('cpu_capability', '?')}")
print(f"{'':18} {'engine s':>9} {'torch s':>9} {'engine tok/s':>13} {'torch tok/s':>12} {'speed-up':>9}")
for k in ours:
    t = peer[f"{k}_s"]
    print(f"{k:18} {ours[k]:9.3f} {t:9.3f} {tokens/ours[k]:13.1f} {tokens/t:12.1f} {t/ours[k]:8.2f}x")
PY
uptime

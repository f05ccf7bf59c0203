#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (under 8 minutes on one H200):
#   1. build with the CUDA kernels, or, where there is no Rust toolchain (the lent GPU
#      machines), use the stripped binaries that `scripts/gpu-check.sh --build-only` put in
#      gpu-bin/ (about 30 MB: carry `gpu-bin`);
#   2. run the CUDA tests (every kernel against its CPU twin, a curvature pass and a
#      training step) and the PTX checks;
#   3. run the CUDA benchmarks and the PyTorch + PEFT bf16 peer;
#   4. print a short table last.
# Results go to $OUT (or gpu-out/): test log, criterion estimates, peer JSON, table.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$root/gpu-bin
out=${OUT:-$root/gpu-out}
mkdir -p "$out"

if [ "${1:-}" = "--build-only" ] || command -v cargo >/dev/null 2>&1; then
  export NVCC=${NVCC:-$root/.nvcc/nvidia/cu13/bin/nvcc}
  [ -x "$NVCC" ] || scripts/install-nvcc.sh
  export LALORA_REQUIRE_CUDA_KERNELS=1
  rm -rf "$bin" && mkdir -p "$bin"
  for target in "--lib" "--test cuda_vs_cpu" "--bench cuda"; do
    # shellcheck disable=SC2086
    exe=$(cargo test --release --no-run $target --message-format=json 2>/dev/null |
      python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable") and j.get("profile",{}).get("test")][-1])')
    # Stripped: the lent machines take at most 64 MiB of carried files.
    strip -o "$bin/$(echo "$target" | awk '{print $NF}' | tr -d -)" "$exe"
  done
  [ "${1:-}" = "--build-only" ] && { echo "gpu-check: binaries in $bin"; exit 0; }
fi

export LALORA_ROOT=$root
# The PTX checks look for ptxas beside $NVCC: use the machine's own CUDA compiler.
NVCC=$(command -v nvcc || echo "${NVCC:-}")
export NVCC
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
echo "== CUDA tests" | tee "$out/tests.log"
"$bin/lib" --test-threads=1 backend::cuda 2>&1 | tee -a "$out/tests.log"
"$bin/cuda_vs_cpu" --test-threads=1 --nocapture 2>&1 | tee -a "$out/tests.log"
echo "== CUDA benchmarks"
CRITERION_HOME=$out/criterion timeout 330 "$bin/cuda" --bench --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "time:|thrpt:|^cuda_|skipped|device" | tee "$out/bench.log"
echo "== PyTorch + PEFT bf16 peer"
timeout 120 python3 benches/peers/torch_peft_cuda_step.py 2>/dev/null | tail -1 | tee "$out/peer.json"
python3 - "$out" <<'PY' | tee "$out/table.md"
import json, os, sys
out = sys.argv[1]
def est(group, bench):
    p = os.path.join(out, "criterion", group, bench, "new", "estimates.json")
    return json.load(open(p))["median"]["point_estimate"] / 1e6 if os.path.exists(p) else float("nan")
rows = [
    ("LoRA forward 4096x2048 r16", "cuda_lora_4096x2048_r16", "forward_fused", "forward_cublas"),
    ("LoRA backward 4096x2048 r16", "cuda_lora_4096x2048_r16", "backward_fused", "backward_cublas"),
    ("diag 16x256 r16 d2048", "cuda_diag_16x256_r16_d2048", "per_sample_squaring", "materialised_cublas"),
    ("KFAC factor 4096x2048", "cuda_kfac_factor_4096x2048", "hand_written_symmetric", "cublas_gemm"),
]
print("| kernel | ours (ms) | cuBLAS sequence (ms) | speed-up |\n|---|---:|---:|---:|")
for name, g, a, b in rows:
    x, y = est(g, a), est(g, b)
    print(f"| {name} | {x:.3f} | {y:.3f} | {y/x:.2f}x |")
g = "cuda_llama1b_shape_4x512"
step = est(g, "lora_forward_backward")
print(f"\n| Llama-3.2-1B shape, 4x512 | ms | relative to fwd+bwd |\n|---|---:|---:|")
for b in ["lora_forward_backward", "curvature_diag", "curvature_kfac"]:
    print(f"| {b} | {est(g, b):.1f} | {est(g, b)/step:.2f}x |")
try:
    peer = json.load(open(os.path.join(out, "peer.json")))
    print(f"\nengine {2048/(step/1e3):.0f} tokens/s vs {peer['peer']}: {peer['tokens_per_s']:.0f} tokens/s ({peer['forward_backward_s']*1e3/step:.2f}x)")
except Exception as e:
    print(f"\npeer: not measured ({e})")
PY

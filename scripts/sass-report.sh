#!/usr/bin/env bash
# Where a kernel's registers and issue slots go, read without a GPU: compile
# kernels/MODULE.cu as build.rs does, assemble it for sm_90 with `ptxas -v` (registers and
# spills per entry), disassemble it with nvdisasm, and count each loop's instructions by
# opcode (scripts/sass_loops.py: static counts, not a profile). BENCHMARKS.md's counts of
# the tenth session come from it.
#
# Usage: scripts/sass-report.sh MODULE [ENTRY...]    (no ENTRY: every entry of the module)
#   e.g. scripts/sass-report.sh lora_gemm lora_gemm_nt
# nvcc and ptxas are the pinned ones of scripts/install-nvcc.sh; nvdisasm (pinned here)
# comes from the Python package index into .nvcc/tools (git-ignored).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "sass-report: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: scripts/sass-report.sh MODULE [ENTRY...]"
module=$1
shift
src=$root/kernels/$module.cu
[ -f "$src" ] || die "no kernels/$module.cu"
"$root/scripts/install-nvcc.sh"
bin=$root/.nvcc/nvidia/cu13/bin
tools=$root/.nvcc/tools
nvdisasm=$tools/nvidia/cu13/bin/nvdisasm
if [ ! -x "$nvdisasm" ]; then
  echo "sass-report: installing nvdisasm into $tools" >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools" nvidia-cuda-nvdisasm==13.5.37 ||
    die "pip could not install nvidia-cuda-nvdisasm"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin/nvcc" --ptx -O3 -std=c++17 -arch="${LALORA_CUDA_ARCH:-compute_80}" -I "$root/kernels" \
  -o "$work/m.ptx" "$src" || die "nvcc failed on $src"
"$bin/ptxas" -arch=sm_90 -v "$work/m.ptx" -o "$work/m.cubin" 2>"$work/ptxas.log" ||
  die "ptxas failed: $(tail -3 "$work/ptxas.log")"
"$nvdisasm" -c "$work/m.cubin" >"$work/m.sass" || die "nvdisasm failed"
# Registers and spills per entry, as ptxas reports them for sm_90.
python3 - "$work/ptxas.log" <<'PY'
import re, sys
entry = None
for line in open(sys.argv[1]):
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        entry = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and entry:
        spills = f"{m.group(1)} bytes spill stores, {m.group(2)} loads"
    m = re.search(r"Used (\d+) registers", line)
    if m and entry:
        print(f"{entry}: {m.group(1)} registers, {spills} (sm_90)")
        entry = None
PY
entries=("$@")
if [ ${#entries[@]} -eq 0 ]; then
  mapfile -t entries < <(sed -n 's/^\.text\.\([A-Za-z0-9_]*\):$/\1/p' "$work/m.sass" | sort)
fi
for e in "${entries[@]}"; do
  python3 "$root/scripts/sass_loops.py" "$work/m.sass" "$e"
done

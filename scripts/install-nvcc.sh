#!/usr/bin/env bash
# Install the pinned CUDA compiler (nvcc + ptxas) from the Python package index into
# .nvcc/ (git-ignored). All five packages are pinned: an unpinned nvidia-nvvm brings a
# cicc that writes PTX ISA 9.5, which ptxas 13.0 and CUDA 13.0 drivers reject.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/.nvcc
nvcc=$dest/nvidia/cu13/bin/nvcc
if [ -x "$nvcc" ] && "$nvcc" --version | grep -q "V13.0.88"; then
  exit 0
fi
echo "install-nvcc: installing nvcc 13.0.88 into $dest" >&2
rm -rf "$dest.tmp"
python3 -m pip install --quiet --disable-pip-version-check --target "$dest.tmp" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$nvcc" --version | tail -2 >&2

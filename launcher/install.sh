#!/usr/bin/env bash
# Idempotent, cached install of recsys-dist's Python environment.
#
#   bash launcher/install.sh            # create/refresh the venv, print its path last
#
# The venv lives outside the checkout (default ~/.cache/recsys-dist/venv) so fresh clones
# reuse it; a stamp holding the hash of every install input makes a second run a no-op.
# Environment:
#   RECSYS_DIST_VENV      venv location (default ${XDG_CACHE_HOME:-$HOME/.cache}/recsys-dist/venv)
#   PYTHON                interpreter used to create the venv (default python3.11 or python3)
#   TORCH_INDEX_URL       extra index for torch wheels, e.g. https://download.pytorch.org/whl/cpu
#   RECSYS_DIST_CUDA=1    install the CUDA fbgemm-gpu + torchrec with deps (auto when nvidia-smi works)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RECSYS_DIST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recsys-dist/venv}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
cuda="${RECSYS_DIST_CUDA:-}"
if [ -z "$cuda" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; else cuda=0; fi
fi

stamp_inputs="$(cat "$here/requirements.txt" "$here/launcher/fbgemm_gpu_shim/pyproject.toml" "$here/pyproject.toml" "$0"; echo "cuda=$cuda")"
want="$(printf '%s' "$stamp_inputs" | sha256sum | cut -d' ' -f1)"
if [ -f "$venv/.recsys-dist-stamp" ] && [ "$(cat "$venv/.recsys-dist-stamp")" = "$want" ]; then
  echo "[install] up to date: $venv (nothing to install)" >&2
  exit 0
fi

echo "[install] building environment in $venv (cuda=$cuda)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
extra=()
[ -n "${TORCH_INDEX_URL:-}" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")

if [ "$cuda" = 1 ]; then
  # GPU machines: the real CUDA fbgemm-gpu matching torch 2.13, torchrec with its deps.
  sed -e '/^fbgemm-gpu-cpu/d' "$here/requirements.txt" > "$venv/requirements-cuda.txt"
  "${pip[@]}" install "${extra[@]}" -r "$venv/requirements-cuda.txt" fbgemm-gpu==1.8.0
  "${pip[@]}" install "${extra[@]}" torchrec==1.9.2
else
  "${pip[@]}" install "${extra[@]}" -r "$here/requirements.txt"
  # The shim satisfies torchrec's `fbgemm-gpu` requirement with the CPU build.
  "${pip[@]}" install "$here/launcher/fbgemm_gpu_shim"
  "${pip[@]}" install --no-deps torchrec==1.9.2
fi
"${pip[@]}" install --no-deps -e "$here"
"${pip[@]}" check
"$venv/bin/python" -c "import torchrec, deepspeed, webdataset, fbgemm_gpu; print('[install] ok: torchrec', torchrec.__version__ if hasattr(torchrec,'__version__') else '', 'deepspeed', deepspeed.__version__)" >&2
printf '%s' "$want" > "$venv/.recsys-dist-stamp"

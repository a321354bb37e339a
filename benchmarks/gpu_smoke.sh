#!/usr/bin/env bash
# GPU smoke run (one CUDA GPU, < 8 min): install check, 1-GPU NCCL train + full-catalog eval of
# DiffuRec on ML-1M, exact ranking against the bf16 GEMM peak measured in the same job, a
# 10M-item table step. Writes benchmarks/out/gpu_smoke.md. See benchmarks/gpu_smoke.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/install.sh  # the CUDA fbgemm-gpu + torchrec when nvidia-smi works (RECSYS_DIST_CUDA=1 forces it)
VENV="${RECSYS_DIST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recsys-dist/venv}"
PYTHONPATH="$PWD" exec "$VENV/bin/python" benchmarks/gpu_smoke.py "$@"

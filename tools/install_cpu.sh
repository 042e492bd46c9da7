#!/usr/bin/env bash
# Install DeltaDeno with its test tools on a CPU-only machine.
#
# The CPU build of torch goes in first: any later requirement on torch is then
# already met, and pip does not fetch the multi-GB CUDA build. open_clip_torch
# goes in without dependencies because it only provides the CLIP BPE merges
# file for the offline tokenizer, and its torchvision dependency would replace
# the CPU torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install "torch==2.13.0"
python -m pip install ".[test]"
python -m pip install --no-deps "open_clip_torch==3.3.0"

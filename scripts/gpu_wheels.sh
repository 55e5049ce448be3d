#!/usr/bin/env bash
# Download, on this (networked) machine, the Python packages Nova needs that the lent GPU
# machine's image lacks, as Python 3.12 x86-64 wheels into ./.whl (git-ignored). The GPU
# machine can reach nothing outside, so these travel with the working tree (carry: .whl) and are
# installed there by benchmarks/gpu_session.sh. The image already has torch (CUDA), triton,
# numpy, safetensors, tokenizers, pillow, matplotlib, httpx, prometheus-client, pytest and
# hypothesis; it lacks fastapi/uvicorn (the server), gguf, openai and schemathesis (tests), and
# has an older transformers (5.17) than the one Nova is tested with here (5.23).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl fastapi uvicorn gguf openai schemathesis "transformers==5.23.0" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
# Binary packages the image has in versions built against its torch: keep the image's.
rm -f .whl/numpy-*.whl .whl/tokenizers-*.whl .whl/safetensors-*.whl .whl/hf_xet-*.whl
du -sh .whl
ls .whl | wc -l

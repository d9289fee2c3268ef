"""The Ascend contract suite: vllm-ascend's released source (tests/vllm_ascend_sdist.py), imported on CPU with the
torch_npu stand-in in `standin/`, exercised through the PFA adapter and the selection patch.

It runs in a process of its own (tests/test_ascend_contract.py starts it), because the stand-in replaces
`torch.npu` and vllm-ascend's modules register themselves with vLLM: neither may leak into the main suite.
"""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: shared helpers

import vllm_ascend_sdist  # noqa: E402

_source = os.environ.get(vllm_ascend_sdist.SOURCE_ENV)
if not _source:
    pytest.exit(f"run through tests/test_ascend_contract.py (it sets {vllm_ascend_sdist.SOURCE_ENV})", returncode=4)
if os.environ.get("VLLM_PFA_STACK_INSTALLED"):  # .venv-vllm030: both on its path already, this package installed
    import vllm_pfa

    assert "site-packages" in vllm_pfa.__file__, f"vllm_pfa must be the installed copy, not {vllm_pfa.__file__}"
else:
    sys.path[:0] = [str(HERE / "standin"), _source]

import torch_npu  # noqa: E402,F401  (the stand-in: must come before vllm_ascend)
import vllm  # noqa: E402

from vllm_pfa_patches.versions import ALLOW_UNVERIFIED_ENV, release  # noqa: E402

# vllm-ascend 0.30.0rc2 pairs with vLLM 0.30.0 (.venv-vllm030): there vllm-ascend's platform plugin is on, so its
# NPU platform is vLLM's current platform as on an Ascend server, and every config goes through its config path.
# Its general plugins stay off (they patch vLLM process-wide; tests/ascend_contract/test_startup.py loads them).
# On the CPU stack's vLLM 0.32, no stack users have: the CPU platform is current (vllm-ascend's config path needs a
# renamed attribute supplied after a config is built, vllm_030_names), and PFA runs only with the opt-in.
ON_PAIRED_VLLM = release(vllm.__version__) == "0.30.0"
os.environ["VLLM_PLUGINS"] = "pfa,ascend" if ON_PAIRED_VLLM else "pfa"
if not ON_PAIRED_VLLM:
    os.environ[ALLOW_UNVERIFIED_ENV] = "1"

from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()  # what vLLM does in every process: our entry points, as installed


def vllm_030_names(vllm_config) -> None:
    """On vLLM 0.32 only: vllm-ascend 0.30.0rc2's config path reads `PassConfig.enable_sp`, which 0.32 renamed
    (sequence parallelism, off by default in 0.30). On its paired vLLM nothing is supplied."""
    if not ON_PAIRED_VLLM:
        object.__setattr__(vllm_config.compilation_config.pass_config, "enable_sp", False)


@pytest.fixture
def calls():
    """torch_npu stand-in calls made during the test."""
    torch_npu.CALLS.clear()
    yield torch_npu.CALLS
    torch_npu.CALLS.clear()

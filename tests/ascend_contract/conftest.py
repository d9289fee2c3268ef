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
# Only our plugins: the sdist's egg-info would otherwise activate vllm-ascend's platform plugin on CPU.
os.environ["VLLM_PLUGINS"] = "pfa"
sys.path[:0] = [str(HERE / "standin"), _source]

import torch_npu  # noqa: E402,F401  (the stand-in: must come before vllm_ascend)

from vllm_pfa import plugin  # noqa: E402

plugin.register()  # what vLLM's general-plugin loading does in every process


def vllm_030_names(vllm_config) -> None:
    """vllm-ascend 0.30.0rc2 targets vLLM 0.30; on the vLLM 0.32 installed here, its config path reads one attribute
    0.32 no longer has (`PassConfig.enable_sp`, sequence parallelism off by default in 0.30)."""
    object.__setattr__(vllm_config.compilation_config.pass_config, "enable_sp", False)


@pytest.fixture
def calls():
    """torch_npu stand-in calls made during the test."""
    torch_npu.CALLS.clear()
    yield torch_npu.CALLS
    torch_npu.CALLS.clear()

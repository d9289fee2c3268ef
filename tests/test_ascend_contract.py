"""Runs the Ascend contract suite (tests/ascend_contract) against vllm-ascend's released source, each module in a
process of its own (the torch_npu stand-in and vllm-ascend's registrations must not leak into this one).

Skipped, with the reason, only where the pinned sdist cannot be fetched; every test inside must pass, none skip.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_ascend_sdist

CONTRACT = Path(__file__).parent / "ascend_contract"


@pytest.fixture(scope="module")
def vllm_ascend_source() -> Path:
    try:
        return vllm_ascend_sdist.source_root()
    except vllm_ascend_sdist.SdistUnavailable as exc:
        pytest.skip(f"vllm-ascend {vllm_ascend_sdist.VERSION} sdist unavailable: {exc}")


@pytest.mark.parametrize("module", sorted(p.name for p in CONTRACT.glob("test_*.py")))
def test_contract(vllm_ascend_source, module):
    env = {**os.environ, vllm_ascend_sdist.SOURCE_ENV: str(vllm_ascend_source)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                           str(CONTRACT / module)], capture_output=True, text=True, timeout=900, env=env,
                          cwd=CONTRACT.parent.parent)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.fullmatch(r"\d+ passed in .*", summary), f"every contract test must run and pass: {summary}"

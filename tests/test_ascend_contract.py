"""Runs the Ascend contract suite (tests/ascend_contract) against vllm-ascend's released source, in a process of its
own per stack (the torch_npu stand-in and vllm-ascend's registrations must not leak into this one; within one stack
the modules share a process, which saves a vLLM and vllm-ascend start-up per module), on two stacks:
- `vllm-0.30.0`: vllm-ascend 0.30.0rc2's paired vLLM, in .venv-vllm030 (scripts/bootstrap_vllm030.sh, run by
  `make test`), where this package is installed as a user installs it; the stack users have.
- `vllm-0.32.0`: this checkout's .venv (the CPU stack), which no vllm-ascend release pairs with; PFA runs there only
  with the opt-in for unverified stacks, and one renamed config attribute is supplied (conftest.py).

Skipped, with the reason, only where the pinned sdist cannot be fetched or the paired environment was not built
(`make test` builds it); every test inside must pass, none skip.
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import vllm_ascend_sdist

CONTRACT = Path(__file__).parent / "ascend_contract"
ROOT = CONTRACT.parent.parent
PAIRED_PYTHON = ROOT / ".venv-vllm030" / "bin" / "python"
# modules that check the paired stack as installed, not the adapter's contract: not run on the CPU stack's vLLM
PAIRED_ONLY = {"test_startup.py"}


@pytest.fixture(scope="module")
def vllm_ascend_source() -> Path:
    try:
        return vllm_ascend_sdist.source_root()
    except vllm_ascend_sdist.SdistUnavailable as exc:
        pytest.skip(f"vllm-ascend {vllm_ascend_sdist.VERSION} sdist unavailable: {exc}")


def _modules(stack: str) -> list[str]:
    return [str(p) for p in sorted(CONTRACT.glob("test_*.py")) if stack == "vllm-0.30.0" or p.name not in PAIRED_ONLY]


@pytest.mark.parametrize("stack", ["vllm-0.30.0", "vllm-0.32.0"])
def test_contract(vllm_ascend_source, stack):
    assert len(_modules(stack)) >= 4, "the contract modules were not found"
    env = {**os.environ, vllm_ascend_sdist.SOURCE_ENV: str(vllm_ascend_source)}
    command = [sys.executable, "-m", "pytest"]
    if stack == "vllm-0.30.0":
        if not PAIRED_PYTHON.exists():
            pytest.skip(f"{PAIRED_PYTHON.parent.parent} not built: run `make test` (scripts/bootstrap_vllm030.sh)")
        # -P: the installed package, not this checkout's sources; the stand-in and vllm-ascend come from the
        # environment's .pth files.
        command = [str(PAIRED_PYTHON), "-P", "-m", "pytest"]
        env["VLLM_PFA_STACK_INSTALLED"] = "1"
    proc = subprocess.run([*command, "-q", "-p", "no:cacheprovider", "-rfEs", *_modules(stack)],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), \
        f"every contract test must run and pass: {summary}\n{proc.stdout[-8000:]}"
    if "warning" in summary:  # not a failed contract, but shown in this run's warnings summary, with its text
        # the section alone: the durations or short summary after it would push its text out of a tail
        section = proc.stdout[proc.stdout.find("warnings summary"):].split("\n=", 1)[0]
        warnings.warn(f"the {stack} contract run warned: {section[:4000]}")

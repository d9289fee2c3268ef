"""Start-up on vllm-ascend's paired stack as installed (.venv-vllm030: vLLM 0.30.0, vllm-ascend 0.30.0rc2, this
package installed with its entry points): each case a fresh vLLM process (tests/stack_probe.py) from plugin loading,
with vllm-ascend's own plugins, through vllm-ascend's NPU platform and the engine arguments of `vllm serve`, to the
config a spawned engine unpickles. Only on the paired vLLM (tests/test_ascend_contract.py runs it there).

vllm-ascend's `ascend_model_loader` general plugin is left out: it imports torch_npu's HCCL process group
(`torch_npu._C`), which no stand-in provides; its other plugins (platform, KV connector, models, profiling) load and
apply their global patches.
"""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from conftest import ON_PAIRED_VLLM
from side_by_side import side_by_side
from vllm_pfa.model_builder import build_model

PROBE = Path(__file__).resolve().parent.parent / "stack_probe.py"
PLUGINS = "pfa,ascend,ascend_kv_connector,ascend_model,ascend_service_profiling"
ASCEND_BACKEND = "vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend"
PFA = ("--attention-backend", "pfa")
ENGINE = ("--dtype", "float16", "--max-model-len", "512")

pytestmark = pytest.mark.skipif(not ON_PAIRED_VLLM, reason="start-up is checked on vllm-ascend's paired vLLM only")


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("VLLM_VERSION", "VLLM_PFA_ALLOW_UNVERIFIED")}
    environment["VLLM_PLUGINS"] = PLUGINS
    proc = subprocess.run([sys.executable, "-P", str(PROBE), "--model", str(build_model("tiny")), *args],
                          capture_output=True, text=True, timeout=600, env=environment | (env or {}), cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def import_first(module: str) -> subprocess.CompletedProcess:
    """A script that imports `module` before vLLM, then reads the PFA member of vLLM's registry."""
    script = (f"import {module}\n"
              "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
              "print(AttentionBackendEnum['PFA'].value)\n")
    environment = {k: v for k, v in os.environ.items() if k != "VLLM_PFA_ALLOW_UNVERIFIED"}
    return subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300,
                          env=environment | {"VLLM_PLUGINS": PLUGINS}, cwd="/")


DEV_BUILD = ("--report-vllm-version", "0.30.1.dev3+gabcdef0.empty", "--", *PFA, *ENGINE)
UNVERIFIED = ("--report-vllm-version", "0.31.0", "--", *PFA, *ENGINE)
FIRST_IMPORTS = ("vllm_pfa", "vllm_pfa.log", "vllm_pfa.plugin", "vllm_pfa_patches.versions")
# every fresh process of this module
RUNS = {
    "serve_as_installed": partial(probe, "--", *PFA, *ENGINE),
    "serve_built_with_target_empty": partial(probe, "--report-vllm-version", "0.30.0+empty", "--", *PFA, *ENGINE),
    "without_pfa": partial(probe, "--", *ENGINE),
    "dev_build": partial(probe, *DEV_BUILD),
    "dev_build_VLLM_VERSION": partial(probe, *DEV_BUILD, env={"VLLM_VERSION": "0.30.0"}),
    "unverified": partial(probe, *UNVERIFIED),
    "unverified_opt_in": partial(probe, *UNVERIFIED, env={"VLLM_PFA_ALLOW_UNVERIFIED": "1"}),
    "cpu_platform": partial(probe, "--", *PFA, *ENGINE, env={"VLLM_PLUGINS": "pfa"}),
    **{f"import_{module}": partial(import_first, module) for module in FIRST_IMPORTS},
}


@pytest.fixture(scope="module")
def runs():
    """{name: RUNS[name]()}, run side by side (tests/side_by_side.py)."""
    with side_by_side(RUNS) as results:
        yield results


@pytest.mark.parametrize("case", ["serve_as_installed", "serve_built_with_target_empty"],
                         ids=["as-installed", "built-with-target-empty"])
def test_vllm_serve_engine_arguments_select_pfa_on_the_npu_platform(runs, case):
    """The issue's crash (every vLLM process down) is gone, and `--attention-backend pfa` survives vllm-ascend's
    config path into the config the engine core unpickles."""
    result, log = runs[case]
    assert result["plugins_loaded"] and result["platform"] == "NPUPlatform"
    assert result["member"] == ASCEND_BACKEND and result["error"] is None
    assert result["config_backend"] == "PFA" and result["child_backend"] == f"PFA {ASCEND_BACKEND}"
    assert "not verified" not in log and "disabled in this process" not in log


def test_without_pfa_vllm_ascend_keeps_its_own_backend_and_nothing_is_said(runs):
    result, log = runs["without_pfa"]
    assert result["error"] is None and result["config_backend"] is None
    assert "vllm-pfa" not in log


@pytest.mark.parametrize("case,selected", [("dev_build", False), ("dev_build_VLLM_VERSION", True)],
                         ids=["as-is", "VLLM_VERSION"])
def test_dev_build_of_vllm(runs, case, selected):
    result, _ = runs[case]
    assert (result["config_backend"] == "PFA") is selected
    if not selected:
        assert "not verified on this Ascend NPU stack (vLLM 0.30.1.dev3, vllm-ascend 0.30.0rc2; verified: vLLM " \
               "0.30.0, vllm-ascend 0.30.0rc2)" in result["error"]


def test_unverified_vllm_is_refused_naming_the_versions_and_the_opt_in_overrides(runs):
    """A vLLM that, like 0.30, has no AttentionBackendEnum.register but is not 0.30: the member is added all the same,
    so that the selection names what is installed and verified; with the opt-in PFA is selected, with a warning."""
    result, log = runs["unverified"]
    assert result["plugins_loaded"] and result["member"] == ASCEND_BACKEND and result["config_backend"] is None
    assert "not verified on this Ascend NPU stack (vLLM 0.31.0, vllm-ascend 0.30.0rc2; verified: vLLM 0.30.0, " \
           "vllm-ascend 0.30.0rc2)" in result["error"]
    assert sum("Ascend NPU stack vLLM 0.31.0, vllm-ascend 0.30.0rc2 is not verified" in line
               for line in log.splitlines()) == 1
    result, log = runs["unverified_opt_in"]
    assert result["config_backend"] == "PFA" and result["child_backend"] == f"PFA {ASCEND_BACKEND}"
    assert "PFA may be selected on it because VLLM_PFA_ALLOW_UNVERIFIED is set" in log


def test_pfa_where_the_cpu_platform_runs_on_an_ascend_installation_is_refused(runs):
    """vllm-ascend's platform plugin turned off: the CPU platform runs vLLM 0.30, which PFA on CPU is not verified on;
    an explicit PFA selection is an error, not CPU_ATTN."""
    result, _ = runs["cpu_platform"]
    assert result["platform"] == "CpuPlatform"
    assert "not verified on this CPU stack (vLLM 0.30.0; verified: vLLM 0.32.0)" in result["error"]


@pytest.mark.parametrize("first_import", FIRST_IMPORTS)
def test_importing_this_package_before_vllm_loads_the_plugin(runs, first_import):
    """On vLLM 0.30 `import vllm` runs platform detection, which loads this package's platform plugin: a script
    that imports vllm_pfa (or any of its modules) first must not break that plugin half-way (it did: a circular
    import, "Failed to load plugin pfa")."""
    proc = runs[f"import_{first_import}"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed to load plugin" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == ASCEND_BACKEND

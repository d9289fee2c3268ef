"""The backend is selected like vLLM's own: in a fresh interpreter whose code never imports vllm_pfa.

`vllm serve` and `vllm bench throughput` (tests/test_e2e.py) are CLI processes that never import it either; here
the offline `LLM` path, which parses `attention_config` before vLLM loads general plugins.
"""

import os
import subprocess
import sys
from functools import partial

import pytest

from vllm_pfa.model_builder import build_model

from side_by_side import side_by_side

PARSE = """
from vllm import LLM  # platform detection runs vLLM's platform plugins
from vllm.config import AttentionConfig
config = AttentionConfig(backend="PFA")
print("parsed", config.backend.name, config.backend.get_path())
"""

GENERATE = """
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], attention_config={"backend": "PFA"}, dtype="float32", gpu_memory_utilization=0.3,
              max_model_len=1024, enforce_eager=True, seed=0)
    out = llm.generate(["a prompt of a few words"], SamplingParams(max_tokens=4, temperature=0))
    print("generated", len(out[0].outputs[0].token_ids))
"""


def _run(code: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    assert "vllm_pfa" not in code
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def parses():
    """PARSE with VLLM_PLUGINS unset, "pfa" and another plugin's name, side by side (tests/side_by_side.py)."""
    plugins = {"unset": {}, "pfa": {"VLLM_PLUGINS": "pfa"}, "other": {"VLLM_PLUGINS": "some_other_plugin"}}
    with side_by_side({name: partial(_run, PARSE, env=env) for name, env in plugins.items()}) as results:
        yield results


@pytest.mark.parametrize("plugins", ["unset", "pfa"])
def test_attention_config_parses_pfa_without_import(parses, plugins):
    proc = parses[plugins]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parsed PFA vllm_pfa.backend.pfa_attn.PFAAttentionBackend" in proc.stdout


def test_plugins_switched_off_leave_pfa_unknown(parses):
    """The name comes from the plugin entry point, nothing else: with our plugins excluded it is unknown."""
    proc = parses["other"]
    assert proc.returncode != 0 and "PFA" in proc.stderr


@pytest.mark.slow
def test_offline_llm_selects_pfa_without_import():
    proc = _run(GENERATE, str(build_model("tiny")), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "generated 4" in proc.stdout
    assert "Using the PFA attention backend" in proc.stdout + proc.stderr  # logged by the engine's worker

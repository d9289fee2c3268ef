"""The operator needs only torch: where vLLM is not installed (the package declares no vLLM dependency) `vllm_pfa`
imports, the operator runs and matches the reference, and the kernel A/B tool (benchmarks/ab_builds.py) starts, so it
can run on a host with torch alone. vLLM's absence is simulated in a fresh interpreter by a finder that refuses it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WITHOUT_VLLM = """
import sys
class RefuseVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, RefuseVllm())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_VLLM + code], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_operator_runs_without_vllm():
    proc = _run("""
import torch
from vllm_pfa import npu_prompt_flash_attention
from vllm_pfa.check_operator import TOLERANCE
from vllm_pfa.ops import compressed_causal_mask, reference_npu_prompt_flash_attention
from vllm_pfa.ops.native_kernel import logger
q, k, v = (torch.randn(1, 300, n, 64).bfloat16() for n in (8, 2, 2))
kwargs = dict(num_heads=8, num_key_value_heads=2, input_layout="BSND", scale_value=0.125, sparse_mode=3,
              atten_mask=compressed_causal_mask())
out = npu_prompt_flash_attention(q, k, v, **kwargs)
tol = TOLERANCE[torch.bfloat16]
torch.testing.assert_close(out.float(), reference_npu_prompt_flash_attention(q, k, v, **kwargs).float(),
                           atol=tol, rtol=tol)
assert not any(name == "vllm" or name.startswith("vllm.") for name in sys.modules), "vllm was imported"
print("logger", logger.name)
""")
    assert "logger vllm.vllm_pfa.ops.native_kernel" in proc.stdout


def test_kernel_ab_tool_starts_without_vllm():
    proc = _run("""
import runpy
sys.argv = ["ab_builds.py", "--help"]
sys.path.insert(0, "benchmarks")
try:
    runpy.run_path("benchmarks/ab_builds.py", run_name="__main__")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
""")
    assert "--variant" in proc.stdout

"""The operator needs only torch: where vLLM is not installed (the package declares no vLLM dependency) `vllm_pfa`
imports, the operator runs and matches the reference, the kernel A/B tool (benchmarks/ab_builds.py) starts, and the
operator benchmark (benchmarks/bench_op.py) runs without vLLM's kernel, so they can run on a host with torch alone.
vLLM's absence is simulated in a fresh interpreter by a finder that refuses it."""

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


def test_operator_benchmark_runs_without_vllm(tmp_path):
    """bench_op.py's whole report on one small shape (the limits' slow GEMMs replaced by fixed rates): vLLM's
    kernel and the ratios to it are left out, the rest is measured and written as JSON and PNG."""
    proc = _run(f"""
import json
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_op
assert bench_op.ops is None
bench_op.shapes = lambda quick: iter([dict(dtype="bf16", heads=4, kv_heads=2, dim=64, lens=[64])])
bench_op.measure_limits = lambda: dict(gemm=dict(bf16=100.0, fp32=50.0, fp16=1.0), fma=60.0)
sys.argv = ["bench_op.py", "--out", "{tmp_path}"]
bench_op.main()
report = json.loads(Path("{tmp_path}", "bench_op.json").read_text())
(row,) = report["results"]
assert {{"pfa", "sdpa", "pfa_alone", "reference"}} <= set(row["gflops"]), row["gflops"]
assert "vllm_cpu_kernel" not in row["gflops"] and "ratio_pfa_vs_kernel" not in row, row
assert row["ratio_pfa_vs_sdpa"] > 0 and row["pfa_share_of_limit"] > 0
assert report["summary"]["vllm_installed"] is False and "min_ratio_pfa_vs_kernel" not in report["summary"]
state = report["summary"]["after_gemm_state"]
assert state is None or state["packing_cycles_after_gemm_vs_write"] > 0, state
assert Path("{tmp_path}", "bench_op.png").stat().st_size > 0
assert not any(name == "vllm" or name.startswith("vllm.") for name in sys.modules), "vllm was imported"
""")
    assert "vLLM is not installed: its CPU kernel is not measured" in proc.stdout

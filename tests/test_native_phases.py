"""The native kernel's phase counters (`_C.phase_cycles`, vllm_pfa/csrc/phase_cycles.h) and the report built on them
(benchmarks/kernel_phases.py): they count only when switched on, every phase a call runs is counted, the phases fit
within the calls' thread time, and counting changes no bit of the output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfa_cases import has_matrix_instructions
from vllm_pfa.ops import native_kernel

pytestmark = pytest.mark.skipif(not native_kernel.available(),
                                reason="the native kernel needs an AVX-512 CPU and a built _C")
REPO = Path(__file__).resolve().parent.parent
PHASES = ["packing", "query", "scores", "softmax", "values", "output"]


def _causal_call(dtype: torch.dtype, heads: int, kv_heads: int, products: str, counting: bool) -> tuple:
    """One causal call (S=300, D=64) with the counters on or off: its output and what was counted during it."""
    kernel = native_kernel.extension()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, 300, 64).to(dtype) for n in (heads, kv_heads, kv_heads))
    out = torch.empty_like(q)
    kernel.phase_cycles(counting)
    kernel.prefill_attention(q, k, v, out, [300], [300], [-301], [0], 0.125, products)
    return out, dict(kernel.phase_cycles(False))


# Both ways threads share the work (few units: a group's K/V packed by all threads, then its query blocks shared; many
# units: a unit per thread at a time), and the products' routes.
CASES = [pytest.param(torch.bfloat16, 4, 1, "auto", id="bf16_few_units"),
         pytest.param(torch.bfloat16, 32, 32, "auto", id="bf16_many_units"),
         pytest.param(torch.float32, 4, 2, "fp32", id="fp32_products"),
         pytest.param(torch.bfloat16, 4, 1, "input_dtype_emulated", id="bf16_emulated"),
         pytest.param(torch.bfloat16, 4, 1, "input_dtype_onednn", id="bf16_onednn",
                      marks=pytest.mark.skipif(not has_matrix_instructions(torch.bfloat16),
                                               reason="no bf16 matrix instructions here"))]


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "products"), CASES)
def test_phases_are_counted_when_on_and_change_nothing(dtype, heads, kv_heads, products):
    quiet, nothing = _causal_call(dtype, heads, kv_heads, products, counting=False)
    assert nothing == dict.fromkeys(PHASES + ["call_thread_cycles"], 0)
    counted_out, counted = _causal_call(dtype, heads, kv_heads, products, counting=True)
    assert list(counted) == PHASES + ["call_thread_cycles"]
    assert all(counted[phase] > 0 for phase in PHASES), counted
    assert sum(counted[phase] for phase in PHASES) <= counted["call_thread_cycles"], counted
    assert torch.equal(counted_out, quiet)
    assert dict(native_kernel.extension().phase_cycles(False)) == nothing  # read once, then reset


def test_kernel_phases_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_phases.py"), "--shapes", "4,2,64,256,bf16",
         "8,8,32,128,fp32", "--calls", "3", "--after-gemm", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_phases.json").read_text())
    assert [r["label"] for r in report["results"]] == ["bf16 N4/2 D64 S=256", "fp32 N8/8 D32 S=128"]
    for r in report["results"]:
        assert list(r["shares"])[:len(PHASES)] == PHASES
        assert all(r["shares"][phase] > 0 for phase in PHASES) and r["gflops"] > 0, r
        assert r["gemm_bf16_gflops"] > 0 and r["share_of_gemm"] == pytest.approx(r["gflops"] / r["gemm_bf16_gflops"])
        assert r["products_gflops"] == pytest.approx(r["gflops"] / (r["shares"]["scores"] + r["shares"]["values"]))
        assert abs(sum(r["shares"].values()) - 1) < 1e-9 and r["shares"]["other (scheduling, waiting, setup)"] >= 0
        after = r["after_gemm"]  # the calls right after the GEMM, against the counted calls after the write
        assert list(after["cycle_ratios"]) == [*PHASES, "call_thread_cycles"] and after["time_ratio"] > 0, after
        assert all(after["cycle_ratios"][name] == pytest.approx(after["cycles"][name] / r["cycles"][name])
                   for name in after["cycle_ratios"]), after
    assert report["after_gemm"] is True
    for png in ("kernel_phases.png", "kernel_phases_after_gemm.png"):
        assert (tmp_path / png).stat().st_size > 0, png

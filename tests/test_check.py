"""`python -m vllm_pfa.check`: the operator table covers the spec and passes on CPU, and fails on a wrong result;
the invalid inputs are refused, and an operator that accepts them fails; on an NPU every case goes to torch_npu;
the environment records the NPU and CANN; the verdicts fail on divergent tokens, distant log-probabilities and PFA
not selected; the CLI writes its JSON and PNG and exits non-zero on a failure; end to end (slow), `--quick` passes,
and a run where PFA is not selected fails."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from vllm_pfa import check_engine, check_env, check_operator
from vllm_pfa.check_report import FAIL, PASS, verdict

CPU = torch.device("cpu")
STANDIN = Path(__file__).parent / "ascend_contract" / "standin"
REPORT_KEYS = {"verdict", "exit_status", "rows", "settings", "environment", "operator", "backend", "speed",
               "duration_s"}


def run_check(*args: str, fault: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "VLLM_PFA_CHECK_FAULT"}
    if fault:
        env["VLLM_PFA_CHECK_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "vllm_pfa.check", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def table_rows(stdout: str) -> dict[str, str]:
    """check name -> status, from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for status in (PASS, FAIL, "INFO", "WARN", "SKIP"):
            name, sep, _ = line.partition(f"  {status} ")
            if sep and name.strip():
                rows[name.strip()] = status
    return rows


# --- operator --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick", [True, False])
def test_operator_table_covers_the_spec_and_passes_on_cpu(quick):
    rows, report = check_operator.run_operator_check(CPU, quick=quick)
    assert [row.status for row in rows] == [PASS, PASS], rows
    tags = [case["tags"] for case in report["cases"]]
    assert all(case["passed"] for case in report["cases"])
    assert {t["layout"] for t in tags} == {"BSH", "BSND", "BNSD", "BNSD_BSND"}
    assert {t["sparse_mode"] for t in tags} == {0, 1, 2, 3, 4}
    assert {"MHA", "GQA", "MQA"} == {"MHA" if t["heads"] == t["kv_heads"] else "MQA" if t["kv_heads"] == 1 else "GQA"
                                     for t in tags}
    assert {t["dtype"] for t in tags} == {"float16", "bfloat16", "int8"}
    assert any(t["int8"] and t["dtype"] != "int8" for t in tags)  # float in, int8 out
    assert any(t["actual_lengths"] for t in tags)


def test_a_wrong_operator_result_fails_every_case():
    rows, report = check_operator.run_operator_check(CPU, quick=True, corrupt=check_operator.corrupt_result)
    assert rows[0].status == FAIL and verdict(rows) == FAIL
    assert not any(case["passed"] for case in report["cases"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compare_holds_the_dtype_tolerance(dtype):
    expected = torch.randn(2, 8, 4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    tol = check_operator.TOLERANCE[dtype]
    for factor, ok in ((0.5, True), (4.0, False)):
        actual = expected.clone()
        actual.view(-1)[3] += factor * tol * (1 + expected.view(-1)[3].abs().float())
        assert check_operator.compare(actual, expected, dtype)[0] is ok, factor
    assert not check_operator.compare(expected.float(), expected, dtype)[0]  # wrong dtype


def test_compare_int8_output_allows_rare_single_steps_only():
    expected = torch.randint(-100, 100, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    for off, ok in ((20, True), (50, False)):  # 2% and 5% of the values one step off
        one_step = expected.clone()
        one_step[:off] += 1
        assert check_operator.compare(one_step, expected, torch.int8)[0] is ok, off
    two_steps = expected.clone()
    two_steps[0] += 2
    assert not check_operator.compare(two_steps, expected, torch.int8)[0]


def test_invalid_inputs_are_refused_and_an_accepting_operator_fails(monkeypatch):
    refusals = [check_operator.run_invalid(case, CPU) for case in check_operator.INVALID_CASES]
    assert all(refusal.refused for refusal in refusals), [r for r in refusals if not r.refused]
    monkeypatch.setattr(check_operator, "npu_prompt_flash_attention", lambda query, key, value, **kwargs: query)
    rows, report = check_operator.run_operator_check(CPU, quick=True)
    assert rows[1].status == FAIL and not any(refusal["refused"] for refusal in report["invalid"])


def test_on_an_npu_every_call_goes_to_torch_npu():
    """The NPU branch against the Ascend contract suite's torch_npu stand-in (torch_npu's registered signatures,
    recording each call, computing with the CPU implementation), the device check forced as no NPU is here: every
    case and every invalid input reaches torch_npu, and the verdicts stay green. In a process of its own: the
    stand-in renames torch's PrivateUse1 device for good."""
    script = f"""
import json, sys
sys.path.insert(0, {str(STANDIN)!r})
import torch, torch_npu
from vllm_pfa import check_operator
from vllm_pfa.ops import api
api.runs_on_npu = lambda query: True
rows, report = check_operator.run_operator_check(torch.device("cpu"), quick=True)
calls = [call for call in torch_npu.CALLS if call.name == "npu_prompt_flash_attention"]
print(json.dumps(dict(statuses=[row.status for row in rows], calls=len(calls),
                      expected=len(report["cases"]) + len(report["invalid"]))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [PASS, PASS] and result["calls"] == result["expected"] > 0, result


def test_environment_records_the_npu_and_cann(monkeypatch, tmp_path):
    toolkit = tmp_path / "ascend-toolkit" / "latest"
    (toolkit / "aarch64-linux").mkdir(parents=True)
    (toolkit / "aarch64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=9.2.0\ninnerversion=V100R001C25\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(toolkit))
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(__version__="2.10.0.post4"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8,
                                                            get_device_name=lambda index: "Ascend910B3"),
                        raising=False)
    assert check_env.npu_available()
    env = check_env.environment(CPU)
    assert env["npu"] == dict(torch_npu="2.10.0.post4", available=True, device_count=8, device_name="Ascend910B3")
    assert env["cann"]["version"] == "9.2.0" and env["cann"]["home"] == str(toolkit)
    lines = "\n".join(check_env.summary(env))
    assert "Ascend910B3" in lines and "CANN: 9.2.0" in lines


def test_environment_without_an_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # importing it fails
    assert not check_env.npu_available() and check_env.operator_device() == CPU
    env = check_env.environment(CPU)
    assert env["npu"] is None and env["operator_device"] == "cpu"
    assert env["packages"]["torch"] is not None and env["cpu"]["cpus"] == os.cpu_count()


# --- backend verdicts, on recorded engine results ---------------------------------------------------------------------
def engine_run(backends=("PFA",), tokens=((5, 6, 7),), top=None, logprobs=(-1.0, -2.0, -0.5), layers=2,
               computed=100, prefill_tokens=200, prefill_calls=4, existing=0) -> dict:
    top = top or [[{str(t): -0.1} for t in seq] for seq in tokens]
    return dict(
        attention=dict(backends=list(backends), layers=layers),
        counters=dict(prefill_calls=prefill_calls, prefill_tokens=prefill_tokens, context_tokens=0, decode_tokens=6,
                      existing_path_prefill_tokens=existing),
        correctness=dict(prompt_logprobs=list(logprobs), computed_prompt_tokens=computed,
                         generations=[dict(name=f"p{i}", tokens=list(seq), top_logprobs=steps)
                                      for i, (seq, steps) in enumerate(zip(tokens, top))]))


DEFAULT = engine_run(backends=("CPU_ATTN",), prefill_tokens=0, prefill_calls=0)


def statuses(rows) -> dict[str, str]:
    return {row.check: row.status for row in rows}


def test_backend_verdicts_pass_on_agreeing_engines():
    rows = check_engine.selection_rows(engine_run(), DEFAULT) + check_engine.correctness_rows(engine_run(), DEFAULT,
                                                                                             "float32")
    assert set(statuses(rows).values()) == {PASS}, rows


def test_pfa_not_selected_fails():
    not_pfa = engine_run(backends=("CPU_ATTN",), prefill_tokens=0, prefill_calls=0)
    assert statuses(check_engine.selection_rows(not_pfa, DEFAULT)) == {
        "backend: PFA selected": FAIL, "backend: prefill through PFA": FAIL}


def test_prefill_beside_pfa_fails():
    rows = check_engine.selection_rows(engine_run(prefill_tokens=150), DEFAULT)  # a quarter of the rows elsewhere
    assert statuses(rows)["backend: prefill through PFA"] == FAIL
    rows = check_engine.selection_rows(engine_run(existing=10), DEFAULT)
    assert statuses(rows)["backend: prefill through PFA"] == FAIL


def test_greedy_divergence_fails_unless_at_a_near_tie():
    default = engine_run(tokens=((5, 6, 7),), top=[[{"5": -0.1}, {"6": -0.7, "9": -0.8}, {"7": -0.1}]])
    def greedy(pfa: dict, dtype: str) -> str:
        return statuses(check_engine.correctness_rows(pfa, default, dtype))["backend: greedy tokens equal"]

    near_tie = engine_run(tokens=((5, 9, 1),))  # diverges where the default engine's candidates are 0.1 apart
    assert greedy(near_tie, "bfloat16") == PASS and greedy(near_tie, "float32") == FAIL
    far = engine_run(tokens=((5, 8, 1),))  # a token the default engine did not even rank
    assert greedy(far, "bfloat16") == FAIL


def test_prompt_logprob_distance_beyond_the_dtype_bound_fails():
    bounds = check_engine.BOUNDS["float32"]
    default = engine_run(logprobs=[-1.0] * 100)
    cases = {(bounds.logprob_max / 2, 1): PASS,  # one position off by half the max bound
             (bounds.logprob_max * 2, 1): FAIL,  # one off by twice the max bound
             (bounds.logprob_mean * 2, 100): FAIL}  # every position off by twice the mean bound
    for (offset, count), status in cases.items():
        pfa = engine_run(logprobs=[-1.0 + offset] * count + [-1.0] * (100 - count))
        rows = statuses(check_engine.correctness_rows(pfa, default, "float32"))
        assert rows["backend: prompt logprob distance"] == status, (offset, count)


def test_speed_is_informational_unless_a_minimum_is_given():
    def run(seconds: float, tokens_per_s: float) -> dict:
        return dict(attention=dict(backends=["X"]), speed=dict(
            ttft={"256": dict(best=seconds)}, ttft_skipped=["16384"], load_average=[0.5, 0.7], cpus=2,
            throughput=dict(prompts=8, input_len=512, output_len=16, tokens_per_s=tokens_per_s)))

    speed = check_engine.speed_report(run(0.2, 500.0), run(0.1, 1000.0))  # PFA twice as slow
    assert speed["ttft"]["256"]["ratio"] == pytest.approx(0.5) and speed["throughput"]["ratio"] == pytest.approx(0.5)
    assert FAIL not in statuses(check_engine.speed_rows(speed, None)).values()
    assert statuses(check_engine.speed_rows(speed, None))["speed: TTFT 16384 tokens"] == "SKIP"
    assert statuses(check_engine.speed_rows(speed, 0.8))["speed: TTFT 256 tokens"] == FAIL


# --- the command -----------------------------------------------------------------------------------------------------
def test_cli_operator_part_writes_the_report(tmp_path):
    proc = run_check("--quick", "--only", "operator", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert table_rows(proc.stdout) == {"operator: spec cases on cpu": PASS, "operator: invalid inputs refused": PASS,
                                       "verdict": PASS}
    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report) == REPORT_KEYS and report["verdict"] == PASS and report["exit_status"] == 0
    assert {"packages", "cpu", "npu", "cann", "operator_device"} <= set(report["environment"])
    assert report["environment"]["cpu"]["isa_flags"] is not None
    assert len(report["operator"]["cases"]) == len(check_operator.QUICK_CASES)
    assert (tmp_path / "check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_non_zero_on_a_wrong_operator_result(tmp_path):
    proc = run_check("--quick", "--only", "operator", "--out", str(tmp_path), fault="operator")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert rows["operator: spec cases on cpu"] == FAIL and rows["verdict"] == FAIL
    assert json.loads((tmp_path / "check.json").read_text())["verdict"] == FAIL


@pytest.mark.slow
def test_quick_check_passes_end_to_end(tmp_path):
    """The whole `--quick` run, every section, on the embedded tiny model: about 40 s here instead of several
    minutes for the default SmolLM2, whose engines (the same scenarios' settings) test_e2e_smollm2.py runs."""
    proc = run_check("--quick", "--model", "tiny", "--out", str(tmp_path))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = table_rows(proc.stdout)
    for check in ("operator: spec cases on cpu", "operator: invalid inputs refused", "backend: PFA selected",
                  "backend: prefill through PFA", "backend: greedy tokens equal", "backend: prompt logprob distance",
                  "verdict"):
        assert rows[check] == PASS, (check, proc.stdout)
    assert {"speed: TTFT 256 tokens", "speed: TTFT 1024 tokens"} <= set(rows)
    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report["speed"]["ttft"]) == {"256", "1024"} and report["speed"]["throughput"]["ratio"] > 0
    assert report["backend"]["engines"]["pfa"]["counters"]["prefill_calls"] > 0
    assert (tmp_path / "check.png").exists()


@pytest.mark.slow
def test_check_fails_when_pfa_is_not_selected(tmp_path):
    """The PFA engine started with the platform's default backend (the test hook): same tokens, but the verdict
    is red."""
    proc = run_check("--quick", "--only", "backend", "--model", "tiny", "--out", str(tmp_path), fault="no-pfa")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    rows = table_rows(proc.stdout)
    assert rows["backend: PFA selected"] == FAIL and rows["backend: prefill through PFA"] == FAIL
    assert rows["backend: greedy tokens equal"] == PASS and rows["verdict"] == FAIL

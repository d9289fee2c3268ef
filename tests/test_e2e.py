"""End to end with real vLLM: offline LLM, a `vllm serve` process queried with the openai client, and
`vllm bench throughput`, each on the embedded tiny model, PFA against the default CPU_ATTN backend."""

import importlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import prompts

from e2e_helpers import VLLM, generate, logged_prefill_tokens, vllm_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    return generate(tmp)


def test_offline_greedy_tokens_match_default_backend(offline):
    pfa, default = offline["PFA"]["tokens"], offline["CPU_ATTN"]["tokens"]
    assert set(pfa) == set(default) and len(pfa) == 11
    for name in default:
        assert pfa[name] == default[name], name


def test_offline_prefill_went_through_pfa(offline):
    stats = offline["PFA"]["stats"]
    assert stats["prefill_calls"] > 0 and stats["prefill_tokens"] > 0
    assert stats["context_tokens"] > 0  # chunked prefill and prefix-cache hits read cached context
    assert stats["decode_tokens"] > 0 and stats["existing_path_prefill_tokens"] == 0
    assert offline["CPU_ATTN"]["stats"]["prefill_calls"] == 0


def test_speculative_decoding_verification_rows_stay_off_pfa(tmp_path):
    """n-gram speculation: the same greedy tokens as CPU_ATTN; every verification row (1 + k query tokens) went to
    CPU_ATTN's kernel, so PFA computed exactly the prompts' tokens once per layer and nothing more."""
    runs = generate(tmp_path, "--speculative", "--run", "speculative")
    pfa, default = runs["PFA"]["speculative"], runs["CPU_ATTN"]["speculative"]
    assert pfa["tokens"] == default["tokens"]
    assert pfa["draft_tokens"] > 0, "the proposer drafted nothing: no verification step ran"
    layers = json.loads((build_model("tiny") / "config.json").read_text())["num_hidden_layers"]
    stats = runs["PFA"]["stats"]
    assert stats["prefill_tokens"] == layers * pfa["prompt_tokens"]
    # every token after a request's first came out of a row on the existing path
    assert stats["decode_tokens"] >= layers * sum(len(t) - 1 for t in pfa["tokens"])


def test_kv_sharing_model_matches_default_backend(tmp_path):
    """Gemma-3n (built locally, random weights) whose last 2 of 4 layers reuse earlier layers' K/V
    (`attn(q, None, None)`): the same greedy tokens as CPU_ATTN on every scenario; the sharing layers' prefills went
    through PFA, reading every token of their sequences from the shared cache."""
    runs = generate(tmp_path, "--model", "gemma3n_kv_shared")
    assert runs["PFA"]["tokens"] == runs["CPU_ATTN"]["tokens"]
    stats = runs["PFA"]["stats"]
    per_layer = stats["prefill_tokens"] // 4
    assert stats["prefill_tokens"] == 4 * per_layer > 0 and stats["existing_path_prefill_tokens"] == 0
    assert stats["context_tokens"] >= 2 * per_layer  # each sharing layer reads at least its new tokens back


def test_serve_with_openai_client(offline, tmp_path):
    model = str(build_model("tiny"))
    log_path = tmp_path / "serve.log"
    scenario_prompts = prompts()
    names = ["short_a", "short_b", "chunked_900", "long_2300"] * 4  # 16 concurrent requests
    with vllm_server(model, log_path) as client:
        def complete(name: str) -> list[int]:
            response = client.completions.create(
                model=model, prompt=scenario_prompts[name], max_tokens=12, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            return response.choices[0].token_ids

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(complete, names))
    expected = offline["CPU_ATTN"]["tokens"]
    for name, tokens in zip(names, results):
        assert tokens == expected[name], name
    log_text = log_path.read_text()
    assert "Using the PFA attention backend" in log_text
    assert logged_prefill_tokens(log_text) >= sum(len(scenario_prompts[n]) for n in set(names))


def test_bench_throughput_runs(monkeypatch):
    """`vllm bench throughput --attention-backend pfa` selects PFA like vLLM's own backends (the benchmarks compare
    it with CPU_ATTN: benchmarks/bench_e2e.py)."""
    backend = "pfa"
    # without a dataset path it uses the random dataset, which ignores --input-len/--output-len
    num_prompts, input_len, output_len = 16, 256, 16
    proc = subprocess.run(
        [VLLM, "bench", "throughput", "--model", str(build_model("tiny")), "--attention-backend", backend,
         "--random-input-len", str(input_len), "--random-output-len", str(output_len),
         "--num-prompts", str(num_prompts), "--dtype", "float32", "--gpu-memory-utilization", "0.3",
         "--max-model-len", "2048", "--enforce-eager", "--seed", "0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Using the PFA attention backend" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    # read with bench_e2e.py's parsers (the benchmarks' figures come from them), this test's own bounds
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    bench_e2e = importlib.import_module("bench_e2e")
    match = bench_e2e.THROUGHPUT.search(proc.stdout)
    assert match, proc.stdout[-2000:]
    totals = bench_e2e.TOTALS.search(proc.stdout)
    assert totals, proc.stdout[-2000:]
    prompt_tokens, output_tokens = map(int, totals.groups())
    assert abs(prompt_tokens - num_prompts * input_len) <= num_prompts  # the random dataset may add a token
    assert output_tokens == num_prompts * output_len
    # the cores vLLM bound its CPU worker to, as bench_e2e.py records them
    cores = bench_e2e.worker_cores(proc.stdout + proc.stderr)
    assert cores and set(cores) <= os.sched_getaffinity(0), (cores, proc.stderr[-4000:])
    print(f"vllm bench throughput --attention-backend {backend}: {match.group(0)}; worker cores {cores}")

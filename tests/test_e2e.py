"""End to end with real vLLM: offline LLM, a `vllm serve` process queried with the openai client, and
`vllm bench throughput`, each on the embedded tiny model, PFA against the default CPU_ATTN backend."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import prompts

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
VLLM = str(Path(sys.executable).parent / "vllm")


def _generate(backend: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{backend}.json"
    proc = subprocess.run([sys.executable, str(HERE / "e2e" / "generate.py"), backend, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    return {backend: _generate(backend, tmp) for backend in ("PFA", "CPU_ATTN")}


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_openai_client(offline, tmp_path):
    import openai

    model = str(build_model("tiny"))
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="DEBUG")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [VLLM, "serve", model, "--attention-backend", "pfa", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096",
             "--max-num-batched-tokens", "512", "--enforce-eager", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        scenario_prompts = prompts()
        names = ["short_a", "short_b", "chunked_900", "long_2300"] * 4  # 16 concurrent requests

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
    finally:
        server.terminate()
        server.wait(timeout=60)
    log_text = log_path.read_text()
    assert "Using the PFA attention backend" in log_text
    prefill_steps = [int(n) for n in re.findall(r"PFA step: \d+ decode tokens, (\d+) prefill tokens", log_text)]
    assert sum(prefill_steps) >= sum(len(scenario_prompts[n]) for n in set(names))


@pytest.mark.parametrize("backend", ["pfa", "CPU_ATTN"])
def test_bench_throughput_runs(backend):
    proc = subprocess.run(
        [VLLM, "bench", "throughput", "--model", str(build_model("tiny")), "--attention-backend", backend,
         "--input-len", "256", "--output-len", "16", "--num-prompts", "16", "--dtype", "float32",
         "--gpu-memory-utilization", "0.3", "--max-model-len", "2048", "--enforce-eager", "--seed", "0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    match = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s", proc.stdout)
    assert match, proc.stdout[-2000:]
    print(f"vllm bench throughput --attention-backend {backend}: {match.group(0)}")

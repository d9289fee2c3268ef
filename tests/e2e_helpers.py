"""Helpers of the end-to-end tests: one engine per subprocess (tests/e2e/generate.py), and a `vllm serve` process on
127.0.0.1 answering an openai client."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import openai

from vllm_pfa.scenarios import MAX_MODEL_LEN, MAX_NUM_BATCHED_TOKENS

from side_by_side import cores, side_by_side

VLLM = str(Path(sys.executable).parent / "vllm")
GENERATE = Path(__file__).parent / "e2e" / "generate.py"
# the scenarios' engine settings (vllm_pfa.scenarios.engine_kwargs), float32
SCENARIO_SERVE_ARGS = ("--dtype", "float32", "--gpu-memory-utilization", "0.3", "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--enforce-eager", "--seed", "0")


BACKENDS = ("PFA", "CPU_ATTN")
_RUNS: dict[tuple, dict[str, dict]] = {}  # per test session: (script, args) -> results


def run_backends(tmp_path: Path, script: Path, *args: str) -> dict[str, dict]:
    """{backend: the JSON that `script BACKEND OUT.json args` writes} for BACKENDS, each engine in a fresh process.

    The processes run side by side (tests/side_by_side.py), each engine's threads bound to a core of its own
    (VLLM_CPU_OMP_THREADS_BIND); where there are fewer cores than backends they run one after the other on all
    cores. Tests that compare these results with an engine on all cores (the served ones) check on the way that the
    thread count changes no token. The same run asked for again in this session (test modules that compare with the
    same reference) is answered from the first instead of starting the same engines again."""
    key = (script, args)
    if key not in _RUNS:
        available = cores()
        bound = len(available) >= len(BACKENDS)

        def run(index: int, backend: str) -> dict:
            fd, out = tempfile.mkstemp(dir=tmp_path, prefix=f"{backend}-", suffix=".json")
            os.close(fd)
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(available[index])) if bound else None
            proc = subprocess.run([sys.executable, str(script), backend, out, *args], capture_output=True,
                                  text=True, timeout=900, env=env)
            assert proc.returncode == 0, (backend, proc.stderr[-4000:])
            return json.loads(Path(out).read_text())

        with side_by_side({backend: partial(run, index, backend) for index, backend in enumerate(BACKENDS)}) as runs:
            _RUNS[key] = dict(runs)
    return _RUNS[key]


def generate(tmp_path: Path, *args: str) -> dict[str, dict]:
    """{backend: the JSON that generate.py writes for it and `args`} (run_backends)."""
    return run_backends(tmp_path, GENERATE, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model: str, log_path: Path, args: Sequence[str], env: dict[str, str] | None = None,
               port: int | None = None) -> subprocess.Popen:
    """`vllm serve model --attention-backend pfa [--host 127.0.0.1 --port port] args`, logging at DEBUG (the
    backend's per-step lines) to log_path."""
    address = ("--host", "127.0.0.1", "--port", str(port)) if port else ()
    environment = dict(os.environ, VLLM_LOGGING_LEVEL="DEBUG", **(env or {}))
    with open(log_path, "w") as log:
        return subprocess.Popen([VLLM, "serve", model, "--attention-backend", "pfa", *address, *args], stdout=log,
                                stderr=subprocess.STDOUT, env=environment)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


@contextmanager
def vllm_server(model: str, log_path: Path, serve_args: Sequence[str] = SCENARIO_SERVE_ARGS,
                startup_timeout_s: float = 300, env: dict[str, str] | None = None) -> Iterator[openai.OpenAI]:
    """`vllm serve model --attention-backend pfa` with `serve_args` (start_vllm); yields an openai client once the
    server answers, and stops the server on exit."""
    port = free_port()
    server = start_vllm(model, log_path, serve_args, env, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        deadline = time.time() + startup_timeout_s
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(2)
        yield client
    finally:
        stop(server)


def logged_prefill_tokens(log_text: str) -> int:
    """Prefill tokens that the PFA backend logged (its DEBUG per-step lines), summed over steps."""
    return sum(int(n) for n in re.findall(r"PFA step: \d+ decode tokens, (\d+) prefill tokens", log_text))

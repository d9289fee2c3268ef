"""End to end on a real pretrained chat model (SmolLM2-135M-Instruct, vllm_pfa.pretrained): greedy chat answers
through PFA equal CPU_ATTN's in float32 (short prompts, a document beyond the 2048-token mask, chunked prefill,
prefix-cache hits), `vllm serve` answers the openai client's chat completions the same way, and in bf16 PFA's prompt
log-probabilities are as close to the float32 reference as CPU_ATTN's; README's demo runs as written."""

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import CHAT_MAX_TOKENS, CHAT_MODEL, CHAT_WAVES, chat_conversations

from e2e_helpers import BACKENDS, generate, logged_prefill_tokens, vllm_server

pytestmark = pytest.mark.slow
MASK_SIZE = 2048  # the side of the compressed causal mask that PFA calls take


@pytest.fixture(scope="module")
def float32(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("float32")
    return generate(tmp, "--model", CHAT_MODEL, "--run", "chat", "--run", "prompt_logprobs")


@pytest.fixture(scope="module")
def bfloat16_prompt_logprobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bfloat16")
    runs = generate(tmp, "--model", CHAT_MODEL, "--dtype", "bfloat16", "--run", "prompt_logprobs")
    return {backend: run["prompt_logprobs"] for backend, run in runs.items()}


def test_greedy_chat_answers_match_default_backend(float32):
    pfa, default = float32["PFA"]["chat"], float32["CPU_ATTN"]["chat"]
    assert set(pfa) == set(default) == set(chat_conversations())
    for name in default:
        assert pfa[name]["text"] == default[name]["text"], name
    assert "Paris" in pfa["capital"]["text"]  # a real model: the answers mean something


def test_chat_prefills_went_through_pfa(float32):
    chat = float32["PFA"]["chat"]
    documents = [name for name in chat if name.startswith("document_")]
    assert all(chat[name]["prompt_tokens"] > MASK_SIZE for name in documents)  # chunked: 512 tokens per step
    assert all(chat[name]["cached_tokens"] > MASK_SIZE for name in CHAT_WAVES[1])  # the document, prefix-cached
    stats = float32["PFA"]["stats"]
    assert stats["prefill_calls"] > 0 and stats["context_tokens"] > 0
    assert stats["decode_tokens"] > 0 and stats["existing_path_prefill_tokens"] == 0
    assert float32["CPU_ATTN"]["stats"]["prefill_calls"] == 0


def test_float32_prompt_logprobs_match_default_backend(float32):
    pfa, default = (np.array(float32[backend]["prompt_logprobs"]) for backend in BACKENDS)
    assert pfa.shape == default.shape and len(pfa) > MASK_SIZE
    np.testing.assert_allclose(pfa, default, rtol=0, atol=1e-3)


def test_bfloat16_prompt_logprobs_as_close_to_float32_as_default_backend(float32, bfloat16_prompt_logprobs):
    reference = np.array(float32["CPU_ATTN"]["prompt_logprobs"])
    error = {backend: float(np.mean(np.abs(np.array(logprobs) - reference)))
             for backend, logprobs in bfloat16_prompt_logprobs.items()}
    print(f"mean |bf16 - float32 prompt logprob| over {len(reference)} tokens: {error}")
    assert error["CPU_ATTN"] > 0  # the bf16 engines did run in bf16
    assert error["PFA"] <= 1.1 * error["CPU_ATTN"], error


def test_serve_chat_completions_with_openai_client(float32, tmp_path):
    model = str(build_model(CHAT_MODEL))
    conversations = chat_conversations()
    log_path = tmp_path / "serve.log"
    answers = {}
    with vllm_server(model, log_path) as client:
        def answer(name: str) -> str:
            response = client.chat.completions.create(model=model, messages=conversations[name],
                                                      max_tokens=CHAT_MAX_TOKENS, temperature=0.0)
            return response.choices[0].message.content

        for wave in CHAT_WAVES:  # concurrent within a wave; the later wave hits the prefix cache
            with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                answers.update(zip(wave, pool.map(answer, wave)))
    expected = float32["CPU_ATTN"]["chat"]
    for name in expected:
        assert answers[name] == expected[name]["text"], name
    log_text = log_path.read_text()
    assert "Using the PFA attention backend" in log_text
    assert logged_prefill_tokens(log_text) >= sum(r["prompt_tokens"] - r["cached_tokens"] for r in expected.values())


def test_demo_runs_as_readme_says():
    """README's first command (`make demo`: the set-up, then `python -m vllm_pfa.demo`) on a clean process: the model
    answers, and the backend's own counters, which the demo prints, show prefill through PFA over a prefix-cached
    document and decode on vLLM's kernel."""
    demo = subprocess.run([sys.executable, "-m", "vllm_pfa.demo"], capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-4000:]
    out = demo.stdout
    assert re.search(r"user: What is the capital of France\?\nassistant: [^\n]*Paris", out), out
    cached = [int(n) for n in re.findall(r"-token document, (\d+) tokens from the prefix cache\]", out)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > MASK_SIZE, out
    counters = dict(re.findall(r"^  (\w+) +(\d+)$", out, re.MULTILINE))
    assert int(counters["prefill_calls"]) > 0 and int(counters["context_tokens"]) > MASK_SIZE, out
    assert int(counters["decode_tokens"]) > 0 and int(counters["existing_path_prefill_tokens"]) == 0, out
    assert "prefill went through npu_prompt_flash_attention" in out

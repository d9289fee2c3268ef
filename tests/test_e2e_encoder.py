"""End to end, encoder-only: a BERT embedding model (bidirectional attention, no KV cache) embedded offline with
`LLM.embed` and served with `vllm serve --runner pooling`, PFA against CPU_ATTN, in fp32."""

from pathlib import Path

import pytest
import torch

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import EMBED_INPUTS

from e2e_helpers import logged_prefill_tokens, run_backends, vllm_server

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    return run_backends(tmp_path_factory.mktemp("embed"), HERE / "e2e" / "embed.py")


def _cosines(actual: list[list[float]], expected: list[list[float]]) -> list[float]:
    assert len(actual) == len(expected) == len(EMBED_INPUTS)
    return [torch.nn.functional.cosine_similarity(torch.tensor(a, dtype=torch.float64),
                                                  torch.tensor(e, dtype=torch.float64), dim=0).item()
            for a, e in zip(actual, expected)]


def test_offline_embeddings_match_default_backend(offline):
    cosines = _cosines(offline["PFA"]["embeddings"], offline["CPU_ATTN"]["embeddings"])
    print(f"offline embed, PFA vs CPU_ATTN cosines: {cosines}")
    assert min(cosines) > MIN_COSINE


def test_offline_encoder_attention_went_through_pfa(offline):
    stats = offline["PFA"]["stats"]
    num_layers = 2
    assert stats["prefill_calls"] >= num_layers and stats["prefill_tokens"] % num_layers == 0
    assert stats["prefill_tokens"] >= num_layers * len(EMBED_INPUTS)  # every input's every token, one-token ones too
    assert stats["decode_tokens"] == stats["context_tokens"] == stats["existing_path_prefill_tokens"] == 0
    assert offline["CPU_ATTN"]["stats"]["prefill_calls"] == 0


def test_serve_embeddings_with_openai_client(offline, tmp_path):
    model = str(build_model("bert_encoder"))
    log_path = tmp_path / "serve.log"
    serve_args = ["--runner", "pooling", "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--enforce-eager",
                  "--seed", "0"]
    with vllm_server(model, log_path, serve_args) as client:
        response = client.embeddings.create(model=model, input=EMBED_INPUTS, encoding_format="float")
    served = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
    for reference in ("PFA", "CPU_ATTN"):
        cosines = _cosines(served, offline[reference]["embeddings"])
        print(f"served (PFA) vs offline {reference} cosines: {cosines}")
        assert min(cosines) > MIN_COSINE
    log_text = log_path.read_text()
    assert "Using the PFA attention backend" in log_text
    assert logged_prefill_tokens(log_text) >= len(EMBED_INPUTS)

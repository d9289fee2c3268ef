"""Runs the shared scenarios on one backend in this process and writes tokens and PFA counters as JSON."""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: the PFA counters are readable here

import vllm_pfa  # noqa: E402,F401  (registers the backend name before LLM parses attention_config)
from vllm import LLM  # noqa: E402

from vllm_pfa.backend.stats import STATS  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402
from vllm_pfa.scenarios import engine_kwargs, run_all  # noqa: E402

if __name__ == "__main__":
    backend, out_path = sys.argv[1], sys.argv[2]
    llm = LLM(**engine_kwargs(str(build_model("tiny")), backend))
    tokens = run_all(llm)
    with open(out_path, "w") as f:
        json.dump({"tokens": tokens, "stats": STATS.snapshot()}, f)

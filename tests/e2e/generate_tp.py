"""Runs the shared scenarios on one backend with tensor_parallel_size=2 (6 query / 2 kv heads: 3 / 1 per rank) and
writes the greedy tokens as JSON. The ranks are worker processes; the test reads their debug log for the PFA steps."""

import json
import sys

from vllm import LLM

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import engine_kwargs, run_all

if __name__ == "__main__":  # the ranks are spawned processes that import this module
    backend, out_path = sys.argv[1], sys.argv[2]
    llm = LLM(**engine_kwargs(str(build_model("tp6x2")), backend) | dict(tensor_parallel_size=2,
                                                                         gpu_memory_utilization=0.15))
    with open(out_path, "w") as f:
        json.dump(run_all(llm), f)

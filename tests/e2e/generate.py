"""Runs shared scenarios (vllm_pfa.scenarios.RUNS) on one backend in this process; writes their results and the PFA
counters as JSON.

    generate.py BACKEND OUT.json [--model tiny] [--dtype float32] [--speculative] [--run tokens ...]
"""

import argparse
import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in-process: the PFA counters are readable here

from vllm import LLM  # noqa: E402

from vllm_pfa.backend.stats import STATS  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402
from vllm_pfa.scenarios import RUNS, engine_kwargs  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("out")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--speculative", action="store_true", help="n-gram speculative decoding")
    parser.add_argument("--run", action="append", choices=list(RUNS), help="default: tokens")
    args = parser.parse_args()
    llm = LLM(**engine_kwargs(str(build_model(args.model)), args.backend, args.dtype, args.speculative))
    results = {name: RUNS[name](llm) for name in args.run or ["tokens"]}
    with open(args.out, "w") as f:
        json.dump({**results, "stats": STATS.snapshot()}, f)

"""One backend's run of the end-to-end benchmark's speculative-decoding workload (bench_e2e.py starts it in a process
of its own): the embedded SmolLM2-135M-Instruct with n-gram speculation, prompts of a repeated line (what prompt
lookup drafts from), greedy. Prints one JSON line: output tokens (and their hash), draft and accepted tokens,
seconds.

    python benchmarks/speculative_run.py BACKEND DTYPE NUM_PROMPTS OUTPUT_LEN
"""

import hashlib
import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_pfa.model_builder import build_model
from vllm_pfa.scenarios import SPECULATIVE_CONFIG, speculative_prompts

LINE_REPEATS = 200  # an 8-token line x 200: 1,600-token prompts


def main() -> None:
    backend, dtype, num_prompts, output_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=str(build_model("smollm2-135m-instruct")), dtype=dtype, attention_config={"backend": backend},
              speculative_config=SPECULATIVE_CONFIG, gpu_memory_utilization=0.3, max_model_len=4096,
              max_num_batched_tokens=2048, enable_prefix_caching=True, seed=0, disable_log_stats=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in speculative_prompts(3, (LINE_REPEATS,) * num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(TokensPrompt(prompt_token_ids=list(range(100, 164))), SamplingParams(max_tokens=8), use_tqdm=False)
    before = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    counter = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print(json.dumps(dict(seconds=seconds, output_tokens=sum(map(len, tokens)),
                          tokens_sha256=hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
                          prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
                          draft_tokens=counter("vllm:spec_decode_num_draft_tokens"),
                          accepted_tokens=counter("vllm:spec_decode_num_accepted_tokens"))))


if __name__ == "__main__":
    main()

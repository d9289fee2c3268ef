"""One backend's run of profile_backend.py's end-to-end measurement (started in a process of its own): the embedded
SmolLM2-135M-Instruct, random prompts, greedy, with the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so
that the attention layers' `impl.forward` calls (prefill and decode; the KV-cache write is a separate call, the same
for both backends) can be timed around the generate call. Prints one JSON line: the generate call's seconds, the
seconds spent in attention forward calls, how many there were, and the engine's prompt and output token counts.

    python benchmarks/attention_share_run.py BACKEND DTYPE NUM_PROMPTS INPUT_LEN OUTPUT_LEN
"""

import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl  # noqa: E402

from vllm_pfa.backend.pfa_attn import PFAAttentionImpl  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402

TIMED = {"pfa": PFAAttentionImpl, "CPU_ATTN": CPUAttentionBackendImpl}  # the impl each backend's layers run
attention = {"seconds": 0.0, "calls": 0}


def timed_forward(cls) -> None:
    """Times `cls.forward` (PFA's impl calls its parent's forward for decode rows: only the outer call counts)."""
    forward = cls.forward

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            attention["seconds"] += time.perf_counter() - start
            attention["calls"] += 1

    cls.forward = wrapper


def main() -> None:
    backend, dtype = sys.argv[1], sys.argv[2]
    num_prompts, input_len, output_len = map(int, sys.argv[3:6])
    timed_forward(TIMED[backend])
    llm = LLM(model=str(build_model("smollm2-135m-instruct")), dtype=dtype, attention_config={"backend": backend},
              gpu_memory_utilization=0.3, max_model_len=input_len + output_len, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, vocab - 100, (input_len,), generator=generator)
                            .tolist()) for _ in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(TokensPrompt(prompt_token_ids=list(range(100, 164))), SamplingParams(max_tokens=8), use_tqdm=False)
    attention.update(seconds=0.0, calls=0)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, attention_seconds=attention["seconds"], attention_calls=attention["calls"],
                          prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
                          output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))))


if __name__ == "__main__":
    main()

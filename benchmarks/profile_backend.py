"""Where a prefill step's attention time goes in the PFA backend: metadata build, pack/gather, the operator
(its kernel, and its own repaging), unpack. Attention layers of the benchmark model's shape (32 query heads, 8 kv
heads, head_dim 128) and of the embedded SmolLM2-135M-Instruct's (9 query heads, 3 kv heads, head_dim 64), bf16,
real vLLM builders and cache, torch.profiler ranges; the backend's overhead (build, pack/gather, unpack) also timed
without the profiler, as a cross-check of its small ranges.

Then attention's share of the whole model's time, end to end: the embedded model on bench_e2e.py's prefill-heavy
workload, each backend in a process of its own (attention_share_run.py), timing the attention layers' forward calls
inside the generate call. The share bounds what any attention kernel can gain end to end (Amdahl: CPU_ATTN's
generate time over its time without attention).

    python benchmarks/profile_backend.py [--out benchmarks/results]
"""

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch.profiler import profile, record_function

from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_pfa.backend import pfa_attn, prefill
from vllm_pfa.backend.pfa_attn import PFAAttentionImpl, PFAMetadataBuilder
from vllm_pfa.model_builder import build_model
from vllm_pfa.testing import make_paged_batch

from bench_e2e import WORKLOADS
from plotting import cpu_info, grouped_bars

BLOCK_SIZE = 128
SCENARIOS = {  # (query_len, seq_len) per request, decodes first
    "fresh prefill 2048": [(2048, 2048)],
    "chunk 512 after 1536 cached": [(512, 2048)],
    "mixed: 8 decodes + 2 prefills": [(1, 700)] * 8 + [(1000, 1000), (300, 1300)],
}
# layer shapes: the benchmark model's, and the embedded chat model's (SmolLM2-135M-Instruct: 9/3 heads, head_dim 64)
LAYERS = {"bench": SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128),
          "smollm2": SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, head_dim=64)}
RANGES = ("build", "pfa_backend.pack_and_gather", "pfa_backend.operator", "pfa_backend.unpack",
          "_C::cpu_attention_with_kv_cache", "pfa_backend.existing_path")


def profile_scenario(requests, config, spec, repeats=5) -> dict:
    kv_spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=spec.num_key_value_heads,
                                head_size=spec.head_dim, dtype=torch.bfloat16)
    builder = PFAMetadataBuilder(kv_spec, [], config, torch.device("cpu"))
    impl = PFAAttentionImpl(spec.num_attention_heads, spec.head_dim, 1 / math.sqrt(spec.head_dim),
                            spec.num_key_value_heads, None, None, "auto")
    layer = SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    batch = make_paged_batch(requests, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_key_value_heads,
                             head_size=spec.head_dim, block_size=BLOCK_SIZE, dtype=torch.bfloat16, isa=builder.isa)
    query, key, value, kv_cache, common = batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata
    output = torch.empty_like(query)

    def step():
        with record_function("step"):
            with record_function("build"):
                metadata = builder.build(0, common)
            impl.forward(layer, query, key, value, kv_cache, metadata, output)

    step()
    # The backend's named ranges are vLLM's record_function_or_nullcontext, ranges only with
    # VLLM_CUSTOM_SCOPES_FOR_PROFILING=1: here they are ranges while profiled, and absent (as in a run) while timed.
    with (mock.patch.object(prefill, "record_function_or_nullcontext", record_function),
          mock.patch.object(pfa_attn, "record_function_or_nullcontext", record_function),
          profile() as prof):
        for _ in range(repeats):
            step()
    totals = {e.key: e.cpu_time_total / repeats / 1e3 for e in prof.key_averages()}
    step_ms = totals["step"]
    parts = {name: totals.get(name, 0.0) for name in RANGES}
    overhead = parts["build"] + parts["pfa_backend.pack_and_gather"] + parts["pfa_backend.unpack"]
    return dict(step_ms=step_ms, parts_ms=parts, backend_overhead_ms=overhead,
                backend_overhead_share=overhead / step_ms,
                wall_clock=wall_clock(lambda: builder.build(0, common),
                                      lambda metadata: impl.forward(layer, query, key, value, kv_cache, metadata,
                                                                    output), repeats=4 * repeats))


def wall_clock(build, forward, repeats) -> dict:
    """The same step without the profiler (which adds a cost to every op it records, so to the backend's many small
    ones): median times of the step, the build, and the operator and existing path timed around their entry points;
    the backend's overhead is the rest of the step."""
    timed = {"operator": 0.0, "existing_path": 0.0}  # this step's, reset before each

    def timing(fn, name):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[name] += time.perf_counter() - start
        return run

    samples = {"step": [], "build": [], "operator": [], "existing_path": []}
    with (mock.patch.object(prefill.native_kernel, "prepare_direct",
                            timing(prefill.native_kernel.prepare_direct, "operator")),
          mock.patch.object(prefill.native_kernel, "run_direct", timing(prefill.native_kernel.run_direct, "operator")),
          mock.patch.object(prefill, "npu_prompt_flash_attention",
                            timing(prefill.npu_prompt_flash_attention, "operator")),
          mock.patch.object(CPUAttentionBackendImpl, "forward",
                            timing(CPUAttentionBackendImpl.forward, "existing_path"))):
        for i in range(repeats + 1):
            timed.update(operator=0.0, existing_path=0.0)
            start = time.perf_counter()
            metadata = build()
            built = time.perf_counter()
            forward(metadata)
            done = time.perf_counter()
            if i:  # the first is a warm-up
                samples["step"].append(done - start)
                samples["build"].append(built - start)
                samples["operator"].append(timed["operator"])
                samples["existing_path"].append(timed["existing_path"])
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    overhead = ms["step"] - ms["operator"] - ms["existing_path"]
    return dict(ms, backend_overhead_ms=overhead, backend_overhead_share=overhead / ms["step"])


SHARE_RUN = Path(__file__).parent / "attention_share_run.py"
SHARE_WORKLOAD = "embedded_prefill_heavy"


def attention_share(dtype: str = "bfloat16") -> dict:
    """Both backends' generate time and the part of it spent in attention layers, on bench_e2e's embedded
    prefill-heavy workload; checks that each ran the workload through the backend it names."""
    w = WORKLOADS[SHARE_WORKLOAD]
    runs = {}
    for backend in ("CPU_ATTN", "pfa"):
        print(f"attention share: {backend}, SmolLM2 {w['input_len']}/{w['output_len']} x {w['num_prompts']} ...",
              file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(SHARE_RUN), backend, dtype, str(w["num_prompts"]),
                               str(w["input_len"]), str(w["output_len"])], capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{backend} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        run = runs[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
        if (run["prompt_tokens"] != w["num_prompts"] * w["input_len"]
                or run["output_tokens"] != w["num_prompts"] * w["output_len"] or run["attention_calls"] == 0):
            raise RuntimeError(f"{backend} did not run the workload through its attention layers: {run}")
        run["attention_share"] = run["attention_seconds"] / run["seconds"]
    base, pfa = runs["CPU_ATTN"], runs["pfa"]
    return dict(workload=dict(w, name=SHARE_WORKLOAD, dtype=dtype), runs=runs,
                e2e_ratio_pfa_vs_cpu_attn=base["seconds"] / pfa["seconds"],
                attention_ratio_pfa_vs_cpu_attn=base["attention_seconds"] / pfa["attention_seconds"],
                amdahl_bound=base["seconds"] / (base["seconds"] - base["attention_seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = VllmConfig(model_config=ModelConfig(model=str(build_model("bench")), dtype="bfloat16"),
                        cache_config=CacheConfig(block_size=BLOCK_SIZE))
    results = {}
    with set_current_vllm_config(config):
        for (layer_name, spec), (scenario, requests) in itertools.product(LAYERS.items(), SCENARIOS.items()):
            name = f"{layer_name}: {scenario}"
            print(f"profiling: {name} ...", file=sys.stderr, flush=True)
            r = results[name] = profile_scenario(requests, config, spec)
            p, w = r["parts_ms"], r["wall_clock"]
            print(f"{name:42s} step {r['step_ms']:7.2f} ms | build {p['build']:.2f} | pack+gather "
                  f"{p['pfa_backend.pack_and_gather']:.2f} | operator {p['pfa_backend.operator']:.2f} (kernel "
                  f"{p['_C::cpu_attention_with_kv_cache']:.2f}, decode included) | decode "
                  f"{p['pfa_backend.existing_path']:.2f} | unpack {p['pfa_backend.unpack']:.2f} ms | "
                  f"backend overhead {100 * r['backend_overhead_share']:.1f}% (profiled), "
                  f"{100 * w['backend_overhead_share']:.1f}% (timed: step {w['step']:.2f} ms, build {w['build']:.2f}, "
                  f"operator {w['operator']:.2f}, existing path {w['existing_path']:.2f}, the rest "
                  f"{w['backend_overhead_ms'] - w['build']:.2f})", flush=True)
    shown = {"metadata build": "build", "pack + gather": "pfa_backend.pack_and_gather",
             "PFA operator": "pfa_backend.operator", "decode (existing path)": "pfa_backend.existing_path",
             "unpack": "pfa_backend.unpack"}
    grouped_bars(args.out / "profile_backend.png",
                 [f"{name}\n(overhead {100 * r['wall_clock']['backend_overhead_share']:.1f}% timed, "
                  f"{100 * r['backend_overhead_share']:.1f}% profiled)" for name, r in results.items()],
                 {label: [r["parts_ms"][key] for r in results.values()] for label, key in shown.items()},
                 ylabel="ms per step (one layer, under torch.profiler)",
                 title="Where a step's attention time goes in the PFA backend",
                 figsize=(14, 5))
    share = attention_share()
    for backend, run in share["runs"].items():
        workload = f"{share['workload']['input_len']}/{share['workload']['output_len']}"
        print(f"SmolLM2 {workload} bf16, {backend:8s}: generate {run['seconds']:.2f} s, "
              f"attention {run['attention_seconds']:.2f} s ({100 * run['attention_share']:.1f}% of it)")
    print(f"PFA vs CPU_ATTN: attention {share['attention_ratio_pfa_vs_cpu_attn']:.2f}x, end to end "
          f"{share['e2e_ratio_pfa_vs_cpu_attn']:.2f}x; CPU_ATTN without attention would be "
          f"{share['amdahl_bound']:.2f}x (the bound on any attention kernel's end-to-end gain here)")
    (args.out / "profile_backend.json").write_text(
        json.dumps(dict(cpu=cpu_info(), scenarios=results, attention_share=share), indent=1))
    grouped_bars(args.out / "attention_share.png", list(share["runs"]),
                 {"attention layers": [r["attention_seconds"] for r in share["runs"].values()],
                  "rest of the model and engine": [r["seconds"] - r["attention_seconds"]
                                                   for r in share["runs"].values()]},
                 ylabel="seconds (generate call)", figsize=(7, 5),
                 title=f"Embedded SmolLM2, random {share['workload']['input_len']}/{share['workload']['output_len']} "
                       f"x {share['workload']['num_prompts']}, bf16: attention's share")
    print(f"wrote {args.out / 'profile_backend.json'}, {args.out / 'profile_backend.png'} and "
          f"{args.out / 'attention_share.png'}")


if __name__ == "__main__":
    main()

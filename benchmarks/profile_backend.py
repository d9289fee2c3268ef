"""Where a prefill step's attention time goes in the PFA backend: metadata build, pack/gather, the operator
(its kernel, and its own repaging), unpack. Attention layers of the benchmark model's shape (32 query heads, 8 kv
heads, head_dim 128) and of the embedded SmolLM2-135M-Instruct's (9 query heads, 3 kv heads, head_dim 64), bf16,
real vLLM builders and cache, torch.profiler ranges.

    python benchmarks/profile_backend.py [--out benchmarks/results]
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import profile, record_function

from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_pfa.backend.pfa_attn import PFAAttentionImpl, PFAMetadataBuilder
from vllm_pfa.model_builder import build_model
from vllm_pfa.testing import make_paged_batch

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
    with profile() as prof:
        for _ in range(repeats):
            step()
    totals = {e.key: e.cpu_time_total / repeats / 1e3 for e in prof.key_averages()}
    step_ms = totals["step"]
    parts = {name: totals.get(name, 0.0) for name in RANGES}
    overhead = parts["build"] + parts["pfa_backend.pack_and_gather"] + parts["pfa_backend.unpack"]
    return dict(step_ms=step_ms, parts_ms=parts, backend_overhead_ms=overhead,
                backend_overhead_share=overhead / step_ms)


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
            p = r["parts_ms"]
            print(f"{name:42s} step {r['step_ms']:7.2f} ms | build {p['build']:.2f} | pack+gather "
                  f"{p['pfa_backend.pack_and_gather']:.2f} | operator {p['pfa_backend.operator']:.2f} (kernel "
                  f"{p['_C::cpu_attention_with_kv_cache']:.2f}, decode included) | decode "
                  f"{p['pfa_backend.existing_path']:.2f} | unpack {p['pfa_backend.unpack']:.2f} ms | "
                  f"backend overhead {100 * r['backend_overhead_share']:.1f}%", flush=True)
    (args.out / "profile_backend.json").write_text(json.dumps(dict(cpu=cpu_info(), scenarios=results), indent=1))
    shown = {"metadata build": "build", "pack + gather": "pfa_backend.pack_and_gather",
             "PFA operator": "pfa_backend.operator", "decode (existing path)": "pfa_backend.existing_path",
             "unpack": "pfa_backend.unpack"}
    grouped_bars(args.out / "profile_backend.png",
                 [f"{name}\n(overhead {100 * r['backend_overhead_share']:.1f}%)" for name, r in results.items()],
                 {label: [r["parts_ms"][key] for r in results.values()] for label, key in shown.items()},
                 ylabel="ms per step (one layer)", title="Where a step's attention time goes in the PFA backend",
                 figsize=(14, 5))
    print(f"wrote {args.out / 'profile_backend.json'} and {args.out / 'profile_backend.png'}")


if __name__ == "__main__":
    main()

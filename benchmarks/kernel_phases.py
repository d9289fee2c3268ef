"""Where the native kernel's time goes, phase by phase, on this CPU.

The kernel counts time-stamp-counter cycles per phase when asked (`_C.phase_cycles`; vllm_pfa/csrc/phase_cycles.h
names the phases), summed over threads; this reports them as shares of the calls' thread time (wall time x threads),
whose rest is scheduling, waiting for other threads and the call's setup. It needs no profiler (the lent AMX hosts
have none) and no vLLM: PyTorch, the built extension and matplotlib.

    python benchmarks/kernel_phases.py [--shapes H,KVH,D,S,dtype ...] [--calls 30] [--products auto]
    (from a bare checkout with the extension built: PYTHONPATH=. python3 benchmarks/kernel_phases.py)

Per shape, calls with the counters on and off alternate on fresh inputs, with a write of --flush-mib MiB between
calls (as ab_builds.py); the report gives the shares, the rate of the calls without counters, and what counting
costs (the median of paired time ratios), and checks that counting changes no bit of the output. JSON and PNG go to
--out.
"""

import argparse
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from ab_builds import DEFAULT_FLUSH_MIB, DEFAULT_SHAPES, DTYPES, run_shapes, shape_label
from plotting import causal_flops, grouped_bars, warm_up
from vllm_pfa.ops import native_kernel

CALL = "call_thread_cycles"
OTHER = "other (scheduling, waiting, setup)"


def measure(kernel, shape: dict, calls: int, products: str, flush: torch.Tensor) -> dict:
    """The phases' shares of the counted calls' thread time, the uncounted calls' GFLOP/s, and counting's cost."""
    heads, kv_heads, dim, seq = (shape[k] for k in ("heads", "kv_heads", "dim", "seq"))
    dtype = DTYPES[shape["dtype"]]
    scale = 1 / math.sqrt(dim)

    def fresh():  # token-major q/k/v, as vLLM passes them
        return [torch.randn(1, seq, n, dim).to(dtype) for n in (heads, kv_heads, kv_heads)]

    def call(q, k, v, counting: bool) -> torch.Tensor:
        out = torch.empty(1, seq, heads, dim, dtype=dtype)  # fresh, as vLLM's layer allocates it
        kernel.phase_cycles(counting)
        kernel.prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
                                 [seq], [seq], [-seq - 1], [0], scale, products)
        return out

    q, k, v = fresh()
    warm_up(lambda: call(q, k, v, True))
    kernel.phase_cycles(False)
    if not torch.equal(call(q, k, v, True), call(q, k, v, False)):
        raise SystemExit(f"counting changed the output on {shape_label(shape)}")
    totals, times = Counter(), {True: [], False: []}
    for i in range(calls):
        q, k, v = fresh()
        for counting in (True, False) if i % 2 == 0 else (False, True):
            flush.fill_(i & 0xFF)
            start = time.perf_counter()
            call(q, k, v, counting)
            times[counting].append(time.perf_counter() - start)
            counted = dict(kernel.phase_cycles(False))
            if counting:
                totals.update(counted)
    if totals[CALL] == 0:
        raise SystemExit("the kernel counted nothing: this build has no phase counters")
    shares = {name: cycles / totals[CALL] for name, cycles in totals.items() if name != CALL}
    shares[OTHER] = 1 - sum(shares.values())
    flops = causal_flops(heads, dim, [seq], [seq])
    return dict(shape, label=shape_label(shape), calls=calls, products=products,
                route=kernel.products_route(q, products), shares=shares, cycles=dict(totals),
                gflops=flops / statistics.median(times[False]) / 1e9,
                counting_cost=statistics.median(a / b for a, b in zip(times[True], times[False])) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="H,KVH,D,S,dtype (causal, one batch)")
    parser.add_argument("--calls", type=int, default=30, help="counted calls per shape (as many uncounted)")
    parser.add_argument("--products", default="auto",
                        help="the kernel's products argument (auto; input_dtype_onednn: oneDNN's brgemm, as on AMX)")
    parser.add_argument("--flush-mib", type=int, default=DEFAULT_FLUSH_MIB,
                        help="MiB written between calls (how cold the next call finds the caches)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    kernel = native_kernel.extension()
    if kernel is None:
        raise SystemExit("the native kernel is not available here (not built, or this CPU lacks AVX-512)")
    args.out.mkdir(parents=True, exist_ok=True)

    def summary(r: dict) -> str:
        shares = "  ".join(f"{name.split(' ')[0]} {100 * share:4.1f}%" for name, share in r["shares"].items())
        return (f"{r['label']:28s} {r['route']:10s} {r['gflops']:7.1f} GFLOP/s  {shares}  "
                f"(counting {100 * r['counting_cost']:+.1f}%)")

    cpu, results = run_shapes(args.shapes, args.flush_mib,
                              lambda shape, flush: measure(kernel, shape, args.calls, args.products, flush), summary)
    report = dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, calls=args.calls,
                  products=args.products, flush_mib=args.flush_mib, results=results)
    (args.out / "kernel_phases.json").write_text(json.dumps(report, indent=1))
    phases = list(results[0]["shares"])
    grouped_bars(args.out / "kernel_phases.png", [r["label"] for r in results],
                 {name: [100 * r["shares"][name] for r in results] for name in phases},
                 ylabel="share of the calls' thread time, %", figsize=(max(10, 1.6 * len(results)), 5),
                 label_rotation=30, title=f"Native kernel phases ({cpu['model']}, {torch.get_num_threads()} threads, "
                                          f"products {args.products})")
    print(f"wrote {args.out / 'kernel_phases.json'} and {args.out / 'kernel_phases.png'}")


if __name__ == "__main__":
    main()

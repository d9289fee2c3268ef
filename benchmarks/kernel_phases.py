"""Where the native kernel's time goes, phase by phase, on this CPU.

The kernel counts time-stamp-counter cycles per phase when asked (`_C.phase_cycles`; vllm_pfa/csrc/phase_cycles.h
names the phases), summed over threads; this reports them as shares of the calls' thread time (wall time x threads),
whose rest is scheduling, waiting for other threads and the call's setup. It needs no profiler (the lent AMX hosts
have none) and no vLLM: PyTorch, the built extension and matplotlib.

    python benchmarks/kernel_phases.py [--shapes H,KVH,D,S,dtype ...] [--calls 30] [--products auto]
    (from a bare checkout with the extension built: PYTHONPATH=. python3 benchmarks/kernel_phases.py)

Per shape, calls with the counters on and off alternate on fresh inputs, with a write of --flush-mib MiB between
calls (as ab_builds.py); a bf16 GEMM (torch.matmul 2048^3) is timed just before and just after them (the faster of
the two: a busy moment only slows it), not between them, where its 24 MB would leave the kernel's memory cold. The
report gives the shares, the rate of the calls without counters, the products' own rate (the call's rate over the
products' share) as a share of that GEMM's, and what counting costs (the median of paired time ratios), and checks
that counting changes no bit of the output. JSON and PNG go to --out.

With --after-gemm, a third call joins each round, counted, right after that GEMM instead of the write: as attention
runs in a model, after its layer's projection. Its cycles per phase over those of the counted call after the write,
per shape (a phase that grows there waits on what the GEMM left behind, not on its own arithmetic), go to the JSON
and to kernel_phases_after_gemm.png.
"""

import argparse
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from ab_builds import DEFAULT_FLUSH_MIB, DEFAULT_SHAPES, DTYPES, run_shapes, shape_label
from plotting import causal_flops, gemm_call, grouped_bars, warm_up
from vllm_pfa.ops import native_kernel

CALL = "call_thread_cycles"
OTHER = "other (scheduling, waiting, setup)"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(kernel, shape: dict, calls: int, products: str, flush: torch.Tensor, after_gemm: bool = False,
            gemm: tuple[Callable[[], object], int] | None = None) -> dict:
    """The phases' shares of the counted calls' thread time, the uncounted calls' GFLOP/s and the products' (against
    a bf16 GEMM timed around them), and counting's cost; with `after_gemm`, each phase's cycles in calls right after
    that GEMM over its cycles in the counted calls after the write. `gemm` (a call and its FLOPs) is that GEMM where
    the caller has one: what state it leaves depends on where its operands lie (kernel_performance.md)."""
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

    gemm, gemm_flops = gemm or gemm_call(torch.bfloat16)

    def gemm_seconds() -> float:
        warm_up(gemm)
        return statistics.median(timed(gemm) for _ in range(5))

    gemm_times = [gemm_seconds()]
    q, k, v = fresh()
    warm_up(lambda: call(q, k, v, True))
    kernel.phase_cycles(False)
    if not torch.equal(call(q, k, v, True), call(q, k, v, False)):
        raise SystemExit(f"counting changed the output on {shape_label(shape)}")
    totals, times = Counter(), {True: [], False: []}
    after_gemm_totals, after_gemm_times = Counter(), []
    kinds = ["counted", "uncounted"] + (["after_gemm"] if after_gemm else [])
    for i in range(calls):
        q, k, v = fresh()
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            counting = kind != "uncounted"
            if kind == "after_gemm":
                gemm()
            else:
                flush.fill_(i & 0xFF)
            seconds = timed(lambda: call(q, k, v, counting))
            counted = dict(kernel.phase_cycles(False))
            if kind == "after_gemm":
                after_gemm_totals.update(counted)
                after_gemm_times.append(seconds)
            else:
                times[counting].append(seconds)
                if counting:
                    totals.update(counted)
    gemm_times.append(gemm_seconds())
    if totals[CALL] == 0:
        raise SystemExit(f"the kernel counted no cycles on {shape_label(shape)}")
    shares = {name: cycles / totals[CALL] for name, cycles in totals.items() if name != CALL}
    shares[OTHER] = 1 - sum(shares.values())
    gflops = causal_flops(heads, dim, [seq], [seq]) / statistics.median(times[False]) / 1e9
    gemm_gflops = gemm_flops / min(gemm_times) / 1e9
    products_gflops = gflops / (shares["scores"] + shares["values"])  # their rate, were they all the call did
    result = dict(shape, label=shape_label(shape), calls=calls, products=products,
                  route=kernel.products_route(q, products), shares=shares, cycles=dict(totals), gflops=gflops,
                  gemm_bf16_gflops=gemm_gflops, share_of_gemm=gflops / gemm_gflops,
                  products_gflops=products_gflops, products_share_of_gemm=products_gflops / gemm_gflops,
                  counting_cost=statistics.median(a / b for a, b in zip(times[True], times[False])) - 1)
    if after_gemm:
        result["after_gemm"] = dict(
            cycles=dict(after_gemm_totals),
            cycle_ratios={name: after_gemm_totals[name] / cycles for name, cycles in totals.items() if cycles},
            time_ratio=statistics.median(a / b for a, b in zip(after_gemm_times, times[True])))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="H,KVH,D,S,dtype (causal, one batch)")
    parser.add_argument("--calls", type=int, default=30, help="counted calls per shape (as many uncounted)")
    parser.add_argument("--products", default="auto",
                        help="the kernel's products argument (auto; input_dtype_onednn: oneDNN's brgemm, as on AMX)")
    parser.add_argument("--flush-mib", type=int, default=DEFAULT_FLUSH_MIB,
                        help="MiB written between calls (how cold the next call finds the caches)")
    parser.add_argument("--after-gemm", action="store_true",
                        help="also count calls right after a bf16 GEMM, as after a layer's projection")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    kernel = native_kernel.extension()
    if kernel is None:
        raise SystemExit("the native kernel is not available here (not built, or this CPU lacks AVX-512)")
    if not hasattr(kernel, "phase_cycles"):
        raise SystemExit("this build of vllm_pfa._C predates the phase counters: rebuild it "
                         "(python setup.py build_ext --inplace)")
    args.out.mkdir(parents=True, exist_ok=True)

    def summary(r: dict) -> str:
        shares = "  ".join(f"{name.split(' ')[0]} {100 * share:4.1f}%" for name, share in r["shares"].items())
        line = (f"{r['label']:28s} {r['route']:10s} {r['gflops']:6.1f} GFLOP/s ({100 * r['share_of_gemm']:.0f}% of "
                f"the GEMM's {r['gemm_bf16_gflops']:.0f}; products {100 * r['products_share_of_gemm']:.0f}%)"
                f"  {shares}  (counting {100 * r['counting_cost']:+.1f}%)")
        if "after_gemm" in r:
            ratios = "  ".join(f"{name.split('_')[0]} x{ratio:.2f}" for name, ratio in
                               r["after_gemm"]["cycle_ratios"].items())
            line += f"\n{'':28s} after the GEMM: time x{r['after_gemm']['time_ratio']:.2f}; cycles {ratios}"
        return line

    cpu, results = run_shapes(args.shapes, args.flush_mib, lambda shape, flush: measure(
        kernel, shape, args.calls, args.products, flush, args.after_gemm), summary)
    report = dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, calls=args.calls,
                  products=args.products, flush_mib=args.flush_mib, after_gemm=args.after_gemm, results=results)
    (args.out / "kernel_phases.json").write_text(json.dumps(report, indent=1))
    phases = list(results[0]["shares"])
    width = max(10, 1.6 * len(results))
    grouped_bars(args.out / "kernel_phases.png", [r["label"] for r in results],
                 {name: [100 * r["shares"][name] for r in results] for name in phases},
                 ylabel="share of the calls' thread time, %", figsize=(width, 5),
                 label_rotation=30, title=f"Native kernel phases ({cpu['model']}, {torch.get_num_threads()} threads, "
                                          f"products {args.products})")
    written = [args.out / "kernel_phases.json", args.out / "kernel_phases.png"]
    if args.after_gemm:
        written.append(args.out / "kernel_phases_after_gemm.png")
        grouped_bars(written[-1], [r["label"] for r in results],
                     {name: [r["after_gemm"]["cycle_ratios"][name] for r in results]
                      for name in results[0]["after_gemm"]["cycle_ratios"]},
                     ylabel="cycles right after a bf16 GEMM / after the write", figsize=(width, 5),
                     label_rotation=30, reference_lines={"no change": 1.0},
                     title=f"Native kernel phases after a GEMM ({cpu['model']}, {torch.get_num_threads()} threads)")
    print(f"wrote {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    main()

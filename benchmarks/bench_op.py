"""The PFA operator's CPU path against vLLM's CPU attention kernel and torch SDPA, causal prefill, one run.

Every shape is timed for all implementations back to back, so the ratios compare like with like on a noisy
machine. The anchor is `cpu_attention_with_kv_cache` on a cache already paged (block size 128, vLLM's CPU default),
writing a freshly allocated output as vLLM's Attention layer does: what the CPU_ATTN backend pays per prefill
layer (its cache write is paid by both backends). PFA gets dense BSND tensors, as the PFA backend passes them,
through the public operator (validation, the kernel; the dispatcher where it has work to do) and through the CPU
backend's own call of the kernel (validated once a step, vLLM's output rows), so the report separates the kernel's
rate from the op's Python work. Float32 rows (SmolLM2's heads, the demo's dtype) sit beside bf16 and fp16.
The bf16 GEMM behind the limits is also timed in each shape's rounds, so a shape measured while the machine ran slower
shows it, and the bf16 rows get a share measured in the same rounds. Where vLLM is not installed (a host with torch
alone, such as a lent accelerator machine's CPU), the rest is measured and vLLM's kernel and the ratios to it are left
out, as the report says.

    python benchmarks/bench_op.py [--quick] [--out benchmarks/results]
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
except ModuleNotFoundError as exc:  # vLLM itself missing; a vLLM that is present but broken still raises
    if exc.name != "vllm":
        raise
    ops = None

from kernel_phases import measure as measure_phases
from plotting import GEMM_N, causal_flops, cpu_info, gemm_call, grouped_bars, warm_up
from vllm_pfa.ops import compressed_causal_mask, native_kernel, npu_prompt_flash_attention
from vllm_pfa.ops import reference_npu_prompt_flash_attention

ANCHOR_BLOCK_SIZE = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timeit_interleaved(calls: dict, min_rounds: int = 3, min_seconds: float = 3.0, max_rounds: int = 20) -> dict:
    """Median seconds of each call, the calls taken in turn (one of each per round) so that they share the
    machine's state: on shared cloud CPUs one build's rate on one shape moved by up to ~25% between runs seconds
    apart, which back-to-back blocks of one call each would turn into a ratio. Each round takes the calls in an
    order of its own (seeded), so which call precedes which varies from round to round: a call runs slower after
    some calls than after others (measured at MHA D64 S=512: the operator right after vLLM's kernel, fp16 131-139
    GFLOP/s, against 149 after SDPA; the backend's call the same way), which a fixed order charges to one of them."""
    for fn in calls.values():
        warm_up(fn)
    times: dict = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_seconds):
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        shuffle(order)
        rounds += 1
    return {name: statistics.median(samples) for name, samples in times.items()}


def timeit(fn, min_repeats: int = 3, min_seconds: float = 1.0) -> float:
    return timeit_interleaved({"call": fn}, min_repeats, min_seconds)["call"]


def gemm_gflops(dtype: torch.dtype, n: int = GEMM_N) -> float:
    """The machine's matrix-multiply rate in this dtype."""
    call, flops = gemm_call(dtype, n)
    return flops / timeit(call) / 1e9


def measure_limits() -> dict:
    """One measurement of the limits: torch.matmul per dtype (oneDNN/MKL) and the native extension's FMA loop."""
    kernel = native_kernel.extension()
    gemm = {name: gemm_gflops(dtype) for name, dtype in
            (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    gemm["fp16"] = gemm_gflops(torch.float16, n=1024)  # smaller: CPUs without fp16 instructions crawl here
    return dict(gemm=gemm, fma=kernel.fp32_fma_peak_gflops(1.0) if kernel else None)


def after_gemm_state(kernel, gemm: tuple) -> dict | None:
    """How this process's kernel reads its inputs right after a bf16 GEMM (bf16 MHA D64 S=512, the kernel's phase
    counters), after `gemm`, the GEMM every shape's rounds time: on this project's VMs a GEMM may leave, depending on
    where its operands lie, a state where the software prefetches the packing relies on do not work
    (benchmarks/kernel_performance.md); the packing then takes ~2-3x the cycles it takes after a plain write and the
    call ~1.1-1.2x the time (1.0-1.05x otherwise). One GEMM, its operands kept, for the whole run: one state
    throughout, and in the slow one the D64 S=512 rows and the fp16 ratios read lower.
    Recorded so a run says which state it ran in; None without the kernel's counters."""
    if kernel is None or not hasattr(kernel, "phase_cycles"):
        return None
    shape = dict(heads=32, kv_heads=32, dim=64, seq=512, dtype="bf16")
    r = measure_phases(kernel, shape, 12, "auto", torch.empty(4 << 20, dtype=torch.uint8), after_gemm=True, gemm=gemm)
    return dict(shape=r["label"], packing_cycles_after_gemm_vs_write=r["after_gemm"]["cycle_ratios"]["packing"],
                call_time_after_gemm_vs_write=r["after_gemm"]["time_ratio"])


def reference_limits(measurements: list[dict]) -> dict:
    """The limits the plot draws, measured in this run (before and after the shapes; the higher of the two, since a
    busy moment only lowers a rate): the 16-bit matrix rate (torch.matmul bf16, oneDNN) and the fp32 peak, the
    higher of an AVX-512 FMA loop (the native extension's probe) and oneDNN/MKL's fp32 GEMM."""
    gemm = {name: max(m["gemm"][name] for m in measurements) for name in measurements[0]["gemm"]}
    fmas = [m["fma"] for m in measurements if m["fma"] is not None]
    fma = max(fmas) if fmas else None
    fp32_peak = max(gemm["fp32"], fma or 0.0)
    lines = {"16-bit matrix rate: torch.matmul bf16 2048^3": gemm["bf16"],
             f"fp32 peak: {'AVX-512 FMA loop' if fp32_peak == fma else 'torch.matmul fp32 2048^3'}": fp32_peak}
    return dict(gemm_gflops=gemm, fp32_fma_loop_gflops=fma, fp32_peak_gflops=fp32_peak, lines=lines,
                measurements=measurements)


def vllm_kernel_call(q, k, v, lens, scale):
    """A closure running vLLM's CPU kernel on K/V paged beforehand (not timed), as CPU_ATTN would."""
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    isa = _get_attn_isa(q.dtype, ANCHOR_BLOCK_SIZE, dim)
    blocks = [-(-n // ANCHOR_BLOCK_SIZE) for n in lens]
    kv_cache = torch.zeros(sum(blocks), kv_heads, 2 * ANCHOR_BLOCK_SIZE, dim, dtype=q.dtype)
    key_cache, value_cache = kv_cache.chunk(2, dim=2)
    first = [sum(blocks[:i]) for i in range(batch)]
    slots = torch.cat([torch.arange(n) + f * ANCHOR_BLOCK_SIZE for n, f in zip(lens, first)])
    ops.cpu_attn_reshape_and_cache(torch.cat([k[b, :n] for b, n in enumerate(lens)]),
                                   torch.cat([v[b, :n] for b, n in enumerate(lens)]), key_cache, value_cache,
                                   slots, isa)
    block_table = torch.zeros(batch, max(blocks), dtype=torch.int32)
    for b in range(batch):
        block_table[b, :blocks[b]] = torch.arange(first[b], first[b] + blocks[b])
    tokens = torch.cat([q[b, :n] for b, n in enumerate(lens)]).contiguous()
    query_start_loc = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(batch, heads, kv_heads, dim, seq_lens, q.dtype, query_start_loc,
                                                   True, -1, isa, envs.VLLM_CPU_ATTN_SPLIT_KV)

    def run():
        out = torch.empty_like(tokens)  # vLLM's Attention layer allocates its output on every call, as here
        ops.cpu_attention_with_kv_cache(tokens, key_cache, value_cache, out, query_start_loc, seq_lens, scale, True,
                                        None, -1, block_table, 0.0, metadata, None)
    return run


def sdpa_call(q, k, v, lens, scale):
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # BNSD, laid out before timing

    def run():
        for b, n in enumerate(lens):
            torch.nn.functional.scaled_dot_product_attention(qb[b:b + 1, :, :n], kb[b:b + 1, :, :n],
                                                             vb[b:b + 1, :, :n], is_causal=True, scale=scale,
                                                             enable_gqa=True)
    return run


def backend_call(q, k, v, lens, kwargs):
    """A closure running the call the CPU backend makes per prefill layer (`backend/prefill.py`): the native kernel
    writing vLLM's [tokens, N, D] output rows, allocated per call as vLLM's Attention layer does, on the call the
    step's first layer validated and prepared (no dispatcher; the step's other layers do not validate again).
    Checked once against the operator's result."""
    starts = [sum(lens[:i]) for i in range(len(lens))]
    prepared = native_kernel.prepare_direct(q, k, v, **kwargs)
    if prepared is None:
        raise RuntimeError("the native kernel did not take this problem: the backend call would run the op")

    def run():
        out = torch.empty(sum(lens), q.shape[2], q.shape[3], dtype=q.dtype)
        if not native_kernel.run_direct(prepared, out, starts, q, k, v):
            raise RuntimeError("the prepared call refused its own inputs' form")
        return out

    expected = npu_prompt_flash_attention(q, k, v, **kwargs)
    if not torch.equal(run(), torch.cat([expected[b, :n] for b, n in enumerate(lens)])):
        raise RuntimeError("the backend call's rows differ from the operator's")
    return run


def shapes(quick: bool):
    seqs = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192]
    for dtype in (["bf16"] if quick else ["bf16", "fp16"]):
        for heads, kv_heads in ((32, 8), (32, 32)):
            for dim in ((128,) if quick else (64, 128)):
                for seq in seqs:
                    yield dict(dtype=dtype, heads=heads, kv_heads=kv_heads, dim=dim, lens=[seq])
    if not quick:  # float32, as the demo and the check run SmolLM2 (9 heads over 3 of 64), in its prefill chunks
        for seq in (256, 512, 1024):
            yield dict(dtype="fp32", heads=9, kv_heads=3, dim=64, lens=[seq])
    for dtype in DTYPES if not quick else ["bf16"]:  # a batch of mixed lengths, padded to the longest
        yield dict(dtype=dtype, heads=32, kv_heads=8, dim=128, lens=[2048, 1000, 517, 130])


def bench_shape(shape: dict, with_reference: bool, gemm: tuple) -> dict:
    dtype, heads, kv_heads, dim, lens = (shape[k] for k in ("dtype", "heads", "kv_heads", "dim", "lens"))
    torch.manual_seed(0)
    seq, batch = max(lens), len(lens)
    q = torch.randn(batch, seq, heads, dim).to(DTYPES[dtype])
    k = torch.randn(batch, seq, kv_heads, dim).to(DTYPES[dtype])
    v = torch.randn(batch, seq, kv_heads, dim).to(DTYPES[dtype])
    scale = 1 / math.sqrt(dim)
    mask = compressed_causal_mask()
    kwargs = dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout="BSND", scale_value=scale,
                  sparse_mode=3, atten_mask=mask, actual_seq_lengths=lens, actual_seq_lengths_kv=lens)
    flops = causal_flops(heads, dim, lens, lens)
    pfa = lambda: npu_prompt_flash_attention(q, k, v, **kwargs)  # noqa: E731
    calls = {"pfa": pfa, "sdpa": sdpa_call(q, k, v, lens, scale)}
    if ops is not None:
        calls = {"vllm_cpu_kernel": vllm_kernel_call(q, k, v, lens, scale), **calls}
    if native_kernel.available():  # else the backend runs the operator itself: the "pfa" timing
        # after another kernel too, as the operator's call is: the Python work around the kernel runs cold there
        calls["pfa_backend_call"] = backend_call(q, k, v, lens, kwargs)
    # The bf16 GEMM of the limits (the run's one, `gemm`), timed in the same rounds: where the machine slows down
    # during a shape (a busy neighbour on a shared host slowed every implementation of one shape by 10-25% in one
    # run), the limits measured before and after the shapes do not, and the share read against them drops with the
    # machine's speed
    calls["gemm_bf16"], gemm_flops = gemm
    seconds = timeit_interleaved(calls)
    gemm_in_rounds = gemm_flops / seconds.pop("gemm_bf16") / 1e9
    # PFA's calls back to back too, as the limits are measured: the calls it alternates with above leave it slower
    # at short sequences (measured at bf16 MHA D64 S=512: 211 interleaved, 228-246 alone, GFLOP/s)
    seconds["pfa_alone"] = timeit(pfa)
    if with_reference and seq <= 1024:
        seconds["reference"] = timeit(lambda: reference_npu_prompt_flash_attention(q, k, v, **kwargs), 1, 0.0)
    gflops = {name: flops / s / 1e9 for name, s in seconds.items()}
    ratios = dict(ratio_pfa_vs_sdpa=seconds["sdpa"] / seconds["pfa"])
    if "vllm_cpu_kernel" in seconds:
        ratios["ratio_pfa_vs_kernel"] = seconds["vllm_cpu_kernel"] / seconds["pfa"]
    return dict(shape, gflops=gflops, seconds=seconds, gemm_bf16_in_rounds_gflops=gemm_in_rounds, **ratios)


def label(r: dict) -> str:
    lens = r["lens"][0] if len(r["lens"]) == 1 else "mixed" + "/".join(map(str, r["lens"]))
    return f"{r['dtype']} N{r['heads']}/{r['kv_heads']} D{r['dim']} S={lens}"


def plot(results: list[dict], limits: dict, path: Path) -> None:
    names = [name for name in ("pfa", "vllm_cpu_kernel", "sdpa") if name in results[0]["gflops"]]
    grouped_bars(path, [label(r) for r in results], {n: [r["gflops"][n] for r in results] for n in names},
                 ylabel="GFLOP/s (causal FLOPs)", figsize=(max(10, len(results) * 0.45), 6), label_rotation=75,
                 title="Causal prefill attention on CPU: PFA vs vLLM CPU kernel vs torch SDPA (lines: this run's "
                       "limits)", reference_lines=limits["lines"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    all_shapes = list(shapes(args.quick))
    cpu = cpu_info()
    kernel = native_kernel.extension()
    products = {name: kernel.products_for(torch.zeros(1, dtype=dtype)) if kernel else None
                for name, dtype in DTYPES.items()}
    # which implementation multiplies (fp32, onednn, bf16_tiles): the report says what it measured
    routes = {name: kernel.products_route(torch.zeros(1, dtype=dtype)) if kernel else None
              for name, dtype in DTYPES.items()}
    print(f"{cpu['model']}, {cpu['cpus']} CPUs, {torch.get_num_threads()} threads; ISA: {' '.join(cpu['isa_flags'])}")
    if ops is None:
        print("vLLM is not installed: its CPU kernel is not measured, and the PFA / kernel ratios are left out")
    print("measuring the limits (again after the shapes) ...", file=sys.stderr, flush=True)
    measurements = [measure_limits()]
    run_gemm = gemm_call(torch.bfloat16)  # one for the run: the state it leaves depends on its operands
    state = after_gemm_state(kernel, run_gemm)
    if state:
        print(f"this process right after a bf16 GEMM ({state['shape']}): the kernel's packing x"
              f"{state['packing_cycles_after_gemm_vs_write']:.2f} its cycles after a write, the call x"
              f"{state['call_time_after_gemm_vs_write']:.2f} (where the software prefetches stop working after "
              f"this GEMM: the packing ~x2-3, the call ~x1.1-1.2; benchmarks/kernel_performance.md)")
    results = []
    print(f"{'shape':44s} {'PFA':>8s} {'kernel':>8s} {'SDPA':>8s} {'ref':>8s}  PFA/kernel  PFA/SDPA (GFLOP/s)")
    for i, shape in enumerate(all_shapes, 1):
        print(f"[{i}/{len(all_shapes)}] {label(shape)} ...", end="\r", file=sys.stderr, flush=True)
        r = bench_shape(shape, with_reference=True, gemm=run_gemm)
        results.append(r)
        g = r["gflops"]
        ref, kernel_rate = (f"{g[name]:8.1f}" if name in g else f"{'-':>8s}"
                            for name in ("reference", "vllm_cpu_kernel"))
        kernel_ratio = f"{r['ratio_pfa_vs_kernel']:9.2f}x" if "ratio_pfa_vs_kernel" in r else f"{'-':>10s}"
        print(f"{label(r):44s} {g['pfa']:8.1f} {kernel_rate} {g['sdpa']:8.1f} {ref}  "
              f"{kernel_ratio} {r['ratio_pfa_vs_sdpa']:8.2f}x", flush=True)
    measurements.append(measure_limits())
    limits = reference_limits(measurements)
    gemm = limits["gemm_gflops"]
    print("torch.matmul GFLOP/s, before / after the shapes: " + ", ".join(
        f"{name} {measurements[0]['gemm'][name]:.0f} / {measurements[1]['gemm'][name]:.0f}" for name in gemm)
        + f"; AVX-512 FMA loop {limits['fp32_fma_loop_gflops'] or 0:.0f}; native kernel products: {products}"
        + f" (routes {routes})")
    # The limit of the products the kernel runs in each dtype: the dtype's GEMM rate where it multiplies in the
    # input dtype, else the fp32 peak (a CPU without fp16 matrix instructions runs fp16 GEMM at ~1 GFLOP/s, a
    # limit the kernel's fp32 products are not bound by)
    product_limits = {name: (gemm[name], f"torch.matmul {name}") if products[name] == "input_dtype"
                      else (limits["fp32_peak_gflops"], "the fp32 peak") for name in DTYPES}
    print("PFA as a share of the limit of its products, measured in this run (the higher of the two measurements): "
          "the operator timed between the other kernels / the CPU backend's call (the kernel without the op's "
          "dispatch) between them / the operator back to back (as the limits are); and the bf16 GEMM timed in the "
          "shape's own rounds, between the same calls (a slower machine during the shape shows there):")
    for r in results:
        limit, limit_name = product_limits[r["dtype"]]
        r["pfa_share_of_limit"], r["limit"] = r["gflops"]["pfa"] / limit, limit_name
        r["pfa_alone_share_of_limit"] = r["gflops"]["pfa_alone"] / limit
        backend = r["gflops"].get("pfa_backend_call", r["gflops"]["pfa"])
        r["pfa_backend_call_share_of_limit"] = backend / limit
        # how fast the machine ran during this shape, as the bf16 GEMM timed in its rounds says; for the bf16 rows
        # also the operator's share of that GEMM, a ratio measured in the same rounds
        r["gemm_bf16_in_rounds_vs_limit"] = r["gemm_bf16_in_rounds_gflops"] / gemm["bf16"]
        in_rounds = f"the bf16 GEMM in its rounds at {100 * r['gemm_bf16_in_rounds_vs_limit']:.0f}% of its limit's rate"
        if limit_name == "torch.matmul bf16":
            r["pfa_share_of_gemm_in_rounds"] = r["gflops"]["pfa"] / r["gemm_bf16_in_rounds_gflops"]
            in_rounds = f"operator {100 * r['pfa_share_of_gemm_in_rounds']:3.0f}% of {in_rounds}"
        print(f"  {label(r):44s} {100 * r['pfa_share_of_limit']:4.0f}% / "
              f"{100 * r['pfa_backend_call_share_of_limit']:4.0f}% / {100 * r['pfa_alone_share_of_limit']:4.0f}% "
              f"of {limit_name} ({limit:.0f} GFLOP/s); {in_rounds}")
    summary = dict(gemm_gflops=gemm, limits=limits, native_products=products, native_products_routes=routes,
                   cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__, vllm_installed=ops is not None,
                   after_gemm_state=state)
    if ops is not None:
        ratios = [r["ratio_pfa_vs_kernel"] for r in results]
        by_dtype = {name: statistics.geometric_mean([r["ratio_pfa_vs_kernel"] for r in results if r["dtype"] == name])
                    for name in DTYPES if any(r["dtype"] == name for r in results)}
        summary.update(min_ratio_pfa_vs_kernel=min(ratios),
                       geomean_ratio_pfa_vs_kernel=statistics.geometric_mean(ratios),
                       geomean_ratio_pfa_vs_kernel_by_dtype=by_dtype)
        print(f"PFA vs vLLM CPU kernel: min {summary['min_ratio_pfa_vs_kernel']:.2f}x, "
              f"geomean {summary['geomean_ratio_pfa_vs_kernel']:.2f}x over {len(results)} shapes; by dtype: "
              + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in by_dtype.items()))
    (args.out / "bench_op.json").write_text(json.dumps(dict(summary=summary, results=results), indent=1))
    plot(results, limits, args.out / "bench_op.png")
    print(f"wrote {args.out / 'bench_op.json'} and {args.out / 'bench_op.png'}")


if __name__ == "__main__":
    main()

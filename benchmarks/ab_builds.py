"""Two or more builds of the native kernel timed against each other in one process (an in-process A/B).

Between processes this machine's rate on one shape moves by up to ~10%, more than most kernel changes are worth; in
one process, calls alternating on fresh inputs, paired ratios repeat within ~1%. One process cannot load two builds
of `vllm_pfa._C`: the second shares the first one's symbols. So each build here is its own extension (its own module
name and C++ namespace) compiled from a copy of `vllm_pfa/csrc` with one edit of `prefill_attention.cpp`; the
baseline is the copy without an edit, and `--control` adds a second, unedited copy whose ratio shows the noise.

    python benchmarks/ab_builds.py --variant kb256 'kKeyBlock = 512;' 'kKeyBlock = 256;' --control
    python benchmarks/ab_builds.py --variant NAME PATTERN REPLACEMENT [--variant ...] [--shapes 32,32,64,512,bf16 ...]
    python benchmarks/ab_builds.py --variant ... --after-gemm    # each call right after a bf16 GEMM

PATTERN is a regular expression that must match the source (else the variant would time the baseline again).
Every build's output is checked against the baseline's on each shape (the same bits, or within 2e-2), so a variant
that computes something else fails instead of being timed. JSON and PNG go to --out.
"""

import argparse
import importlib.util
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from plotting import causal_flops, cpu_info, gemm_call, grouped_bars, warm_up

CSRC = Path(__file__).resolve().parent.parent / "vllm_pfa" / "csrc"
KERNEL_SOURCE = "prefill_attention.cpp"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ["32,32,64,512,bf16", "32,8,64,512,bf16", "9,3,64,512,bf16", "32,32,128,512,bf16",
                  "32,32,64,1024,bf16", "32,8,128,2048,bf16"]
# outputs are convex combinations of N(0, 1) value rows; a build computing something else differs by ~0.1-1
AGREEMENT_ATOL = 2e-2
# MiB written between calls. 4: the next call finds its inputs and scratch in L3, as a layer's producer leaves them
# after a small model's weights went through; 64: the kernel's scratch comes back from memory, as after a large
# model's layer (measured at bf16 D64 S=512: 2-5% of the call, beyond the cost of cold inputs and output)
DEFAULT_FLUSH_MIB = 4


def edited_source(source: str, pattern: str, replacement: str) -> str:
    edited, count = re.subn(pattern, replacement, source)
    if count == 0:
        raise SystemExit(f"pattern {pattern!r} does not occur in {KERNEL_SOURCE}: that variant would be the baseline")
    return edited


def build(name: str, work_dir: Path, edit: tuple[str, str] | None):
    """The kernel compiled as extension `name`, its C++ namespace renamed so no symbol is shared with other builds."""
    src = work_dir / name
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(CSRC, src)
    if edit is not None:
        path = src / KERNEL_SOURCE
        path.write_text(edited_source(path.read_text(), *edit))
    print(f"building {name} ...", file=sys.stderr, flush=True)
    load(name=name, sources=sorted(str(p) for p in src.glob("*.cpp")), build_directory=str(src),
         extra_cflags=["-O3", "-fopenmp", f"-Dvllm_pfa=vllm_pfa_ab_{name}"], extra_ldflags=["-fopenmp"])
    spec = importlib.util.spec_from_file_location(name, src / f"{name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_shape(text: str) -> dict:
    heads, kv_heads, dim, seq, dtype = text.split(",")
    return dict(heads=int(heads), kv_heads=int(kv_heads), dim=int(dim), seq=int(seq), dtype=dtype)


def shape_label(shape: dict) -> str:
    return f"{shape['dtype']} N{shape['heads']}/{shape['kv_heads']} D{shape['dim']} S={shape['seq']}"


def causal_call(module, q, k, v, out, scale: float) -> None:
    seq = q.shape[1]
    module.prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
                             [seq], [seq], [-seq - 1], [0], scale, "auto")


def compare(shape: dict, modules: dict, rounds: int, before_call: Callable[[int], object]) -> dict:
    """Median GFLOP/s of each build and the median of its paired time ratios against the first (the baseline);
    `before_call(round)` runs before every call (untimed)."""
    heads, kv_heads, dim, seq = (shape[k] for k in ("heads", "kv_heads", "dim", "seq"))
    dtype = DTYPES[shape["dtype"]]
    flops = causal_flops(heads, dim, [seq], [seq])
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # the outputs compared as raw bits
    names = list(modules)
    # A fixed order (or one alternating with its reverse) leaves the first and last calls of a round to the same
    # builds: on an AMX CPU those positions measured ~10% slower (two unedited copies at the ends read the same, an
    # edited one between them 10% faster), so the order is drawn anew each round.
    order = random.Random(0)
    times = {name: [] for name in names}
    agreement = {}
    for i in range(rounds + 1):  # round 0: warm-up and the check of the results
        q, k, v = (torch.randn(1, seq, n, dim).to(dtype) for n in (heads, kv_heads, kv_heads))
        outs = {}
        for name in order.sample(names, len(names)):  # each build in every position equally often
            before_call(i)
            out = torch.empty(1, seq, heads, dim, dtype=dtype)  # fresh, as vLLM's layer allocates it
            start = time.perf_counter()
            causal_call(modules[name], q, k, v, out, 1 / math.sqrt(dim))
            if i > 0:
                times[name].append(time.perf_counter() - start)
            outs[name] = out
        if i == 0:
            for name in names:
                warm_up(lambda name=name: causal_call(modules[name], q, k, v, outs[name], 1 / math.sqrt(dim)))
            base = outs[names[0]]
            for name in names[1:]:
                same = torch.equal(base.view(bits), outs[name].view(bits))
                diff = float((base.float() - outs[name].float()).abs().max())
                if not same and diff > AGREEMENT_ATOL:
                    raise SystemExit(f"{name} differs from {names[0]} by {diff} on {shape_label(shape)}")
                agreement[name] = dict(bit_identical=same, max_abs_diff=diff)
    result = dict(shape, label=shape_label(shape), rounds=rounds,
                  gflops={name: flops / statistics.median(t) / 1e9 for name, t in times.items()},
                  ratio_vs_baseline={}, agreement=agreement)
    for name in names[1:]:
        paired = [a / b for a, b in zip(times[names[0]], times[name])]
        result["ratio_vs_baseline"][name] = statistics.median(paired)
    return result


def run_shapes(texts: list[str], flush_mib: int, measure: Callable[[dict, torch.Tensor], dict],
               summary: Callable[[dict], str]) -> tuple[dict, list[dict]]:
    """The CPU (printed and returned), and `measure(shape, flush)` of each H,KVH,D,S,dtype text with its progress
    shown, `summary(result)` printed per shape; `flush` is the buffer of flush_mib MiB to write between calls."""
    cpu = cpu_info()
    print(f"{cpu['model']}, {cpu['cpus']} CPUs, {torch.get_num_threads()} threads; ISA: {' '.join(cpu['isa_flags'])}")
    flush = torch.empty(flush_mib << 20, dtype=torch.uint8)
    results = []
    for i, text in enumerate(texts, 1):
        shape = parse_shape(text)
        print(f"[{i}/{len(texts)}] {shape_label(shape)} ...", end="\r", file=sys.stderr, flush=True)
        results.append(measure(shape, flush))
        print(summary(results[-1]), flush=True)
    return cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs=3, action="append", metavar=("NAME", "PATTERN", "REPLACEMENT"),
                        required=True, help="a build with one regular-expression edit of prefill_attention.cpp")
    parser.add_argument("--control", action="store_true", help="also time an unedited copy (the noise floor)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="H,KVH,D,S,dtype (causal, one batch)")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--flush-mib", type=int, default=DEFAULT_FLUSH_MIB,
                        help="MiB written between calls (how cold the next call finds the caches)")
    parser.add_argument("--after-gemm", action="store_true",
                        help="a bf16 GEMM (torch.matmul 2048^3) before every call instead of the write, as a layer's "
                             "projection precedes attention: the state where this VM's software prefetches may not "
                             "work (benchmarks/kernel_performance.md)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = args.out / "ab_builds"
    kernel_source = (CSRC / KERNEL_SOURCE).read_text()
    for name, pattern, replacement in args.variant:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in ("baseline", "control"):
            raise SystemExit(f"variant name {name!r}: lower-case letters, digits and _, not baseline or control")
        edited_source(kernel_source, pattern, replacement)  # before any build: a pattern that misses fails at once
    modules = {"baseline": build("baseline", work_dir, None)}
    for name, pattern, replacement in args.variant:
        modules[name] = build(name, work_dir, (pattern, replacement))
    if args.control:
        modules["control"] = build("control", work_dir, None)

    def summary(r: dict) -> str:
        ratios = "  ".join(f"{name} {100 * (x - 1):+.1f}%" for name, x in r["ratio_vs_baseline"].items())
        rates = " ".join(f"{name} {g:.1f}" for name, g in r["gflops"].items())
        return f"{r['label']:28s} GFLOP/s: {rates}   vs baseline: {ratios}"

    gemm = gemm_call(torch.bfloat16)[0] if args.after_gemm else None

    def measure(shape: dict, flush: torch.Tensor) -> dict:
        before_call = (lambda i: gemm()) if gemm else (lambda i: flush.fill_(i & 0xFF))
        return compare(shape, modules, args.rounds, before_call)

    cpu, results = run_shapes(args.shapes, 0 if args.after_gemm else args.flush_mib, measure, summary)
    report = dict(cpu=cpu, threads=torch.get_num_threads(), rounds=args.rounds,
                  flush_mib=None if args.after_gemm else args.flush_mib, after_gemm=args.after_gemm,
                  variants={name: dict(pattern=p, replacement=r) for name, p, r in args.variant},
                  control=args.control, results=results)
    (args.out / "ab_builds.json").write_text(json.dumps(report, indent=1))
    others = [name for name in modules if name != "baseline"]
    grouped_bars(args.out / "ab_builds.png", [r["label"] for r in results],
                 {name: [100 * (r["ratio_vs_baseline"][name] - 1) for r in results] for name in others},
                 ylabel="speed vs the baseline build, % (median of paired calls)", figsize=(10, 5),
                 label_rotation=30, title="Kernel builds timed in one process against the unedited source")
    print(f"wrote {args.out / 'ab_builds.json'} and {args.out / 'ab_builds.png'}")


if __name__ == "__main__":
    main()

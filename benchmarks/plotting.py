"""What the benchmarks share: the grouped bar chart they write as PNG, the CPU they ran on (the package's own
probe, which `python -m vllm_pfa.check` reports too), the FLOPs of a causal prefill, the GEMM their limits time, and
the warm-up before timing."""

import time
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_pfa.check_env import cpu_info  # noqa: F401  (re-exported for the benchmarks)


def causal_flops(heads: int, head_dim: int, q_lens: list[int], kv_lens: list[int]) -> float:
    """QK^T and PV over the kept (bottom-right causal) pairs: 4 * N * D per pair."""
    pairs = sum(aq * akv - aq * (aq - 1) // 2 for aq, akv in zip(q_lens, kv_lens))
    return 4.0 * heads * head_dim * pairs


GEMM_N = 2048


def gemm_call(dtype: torch.dtype, n: int = GEMM_N) -> tuple[Callable[[], torch.Tensor], int]:
    """torch.matmul of two n x n matrices (oneDNN/MKL) and its FLOPs."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return (lambda: a @ b), 2 * n ** 3


# Where the products run through oneDNN's brgemm (AMX), each thread generates a kernel per product shape the first
# time it meets it, and the kernel's work-sharing hands each thread other query blocks on each call: on a 16-core AMX
# Xeon, 16 threads, bf16 9/3 D64 S=512 took a median 2.0 ms over its first 15 calls (up to 12.6), 0.2 ms once warm.
WARMUP_CALLS, WARMUP_SECONDS = 3, 0.3


def warm_up(fn: Callable[[], object]) -> None:
    """Calls `fn` at least WARMUP_CALLS times and for at least WARMUP_SECONDS, before it is timed."""
    start, calls = time.perf_counter(), 0
    while calls < WARMUP_CALLS or time.perf_counter() - start < WARMUP_SECONDS:
        fn()
        calls += 1


def grouped_bars(path: Path, labels: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
                 figsize: tuple[float, float], label_rotation: int = 0,
                 reference_lines: dict[str, float] | None = None) -> None:
    """Bars per label, one series per colour; `reference_lines`: horizontal lines across the chart (name: value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(labels))], values, width, label=name)
    for i, (name, value) in enumerate((reference_lines or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{len(series) + i}", label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=label_rotation, ha="right" if label_rotation else "center",
                  fontsize=7 if label_rotation else None)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)

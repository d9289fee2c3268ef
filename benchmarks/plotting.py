"""What the benchmarks share: the grouped bar chart they write as PNG, the CPU they ran on (the package's own
probe, which `python -m vllm_pfa.check` reports too), and the FLOPs of a causal prefill."""

from pathlib import Path

from vllm_pfa.check_env import cpu_info  # noqa: F401  (re-exported for the benchmarks)


def causal_flops(heads: int, head_dim: int, q_lens: list[int], kv_lens: list[int]) -> float:
    """QK^T and PV over the kept (bottom-right causal) pairs: 4 * N * D per pair."""
    pairs = sum(aq * akv - aq * (aq - 1) // 2 for aq, akv in zip(q_lens, kv_lens))
    return 4.0 * heads * head_dim * pairs


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

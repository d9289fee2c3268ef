"""What both benchmarks share: the grouped bar chart they write as PNG, and the CPU they ran on."""

import os
import platform
from pathlib import Path

# The instruction-set flags that decide which kernels can run (the matrix ones above all)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_info() -> dict:
    """The CPU's model, core count and which of ISA_FLAGS it has (Linux /proc/cpuinfo)."""
    model, flags = platform.processor(), set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return dict(model=model, cpus=os.cpu_count(), isa_flags=[f for f in ISA_FLAGS if f in flags])


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

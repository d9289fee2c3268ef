"""What `python -m vllm_pfa.check` reports: one verdict row per check, the table on the terminal, the JSON and the PNG.

Statuses: PASS and FAIL decide the exit status; INFO (a measurement reported, e.g. a speed ratio on CPU), WARN (a
measurement below its soft threshold) and SKIP (not run here, with the reason) never fail the check.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PASS, FAIL, INFO, WARN, SKIP = "PASS", "FAIL", "INFO", "WARN", "SKIP"
_COLORS = {PASS: "32", FAIL: "31", WARN: "33", INFO: "36", SKIP: "90"}


@dataclass
class Row:
    check: str
    status: str
    detail: str


def verdict(rows: list[Row]) -> str:
    return FAIL if not rows or any(row.status == FAIL for row in rows) else PASS


def format_table(rows: list[Row], color: bool = False) -> str:
    """The verdict table: one line per check, then the overall verdict."""
    width = max(len(row.check) for row in [*rows, Row("verdict", "", "")])

    def paint(status: str) -> str:
        padded = f"{status:6s}"
        return f"\033[{_COLORS[status]}m{padded}\033[0m" if color and status in _COLORS else padded

    lines = [f"{'check':{width}s}  {'result':6s}  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{row.check:{width}s}  {paint(row.status)}  {row.detail}" for row in rows]
    overall = verdict(rows)
    failed = sum(row.status == FAIL for row in rows)
    lines += [f"{'-' * width}  ------", f"{'verdict':{width}s}  {paint(overall)}  "
              + (f"{failed} of {len(rows)} checks failed" if failed else f"{len(rows)} checks, none failed")]
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1, default=_jsonable))


def _jsonable(value: object) -> object:
    return asdict(value) if isinstance(value, Row) else str(value)


def write_png(path: Path, report: dict) -> str | None:
    """Three panels: the operator cases' worst error as a share of their tolerance, time to first token per prompt
    length, and prefill-heavy throughput, PFA against the default backend. Returns why no PNG was written, or None.
    matplotlib is an optional dependency (the `bench` extra): without it the check still runs."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no PNG written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ops, ttft, throughput) = plt.subplots(1, 3, figsize=(16, 5.5), gridspec_kw=dict(width_ratios=[2.2, 1, 0.7]))
    _operator_panel(ops, report.get("operator") or {})
    _speed_panels(ttft, throughput, report.get("speed") or {})
    settings = report["settings"]
    fig.suptitle(f"vllm-pfa check: {report['verdict']} ({settings['mode']}, {settings['dtype']}, model "
                 f"{settings['model_name']}, operator on {report['environment']['operator_device']})",
                 color="green" if report["verdict"] == PASS else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _operator_panel(ax, operator: dict) -> None:
    cases = operator.get("cases") or []
    if not cases:
        ax.text(0.5, 0.5, "operator table not run", ha="center", transform=ax.transAxes)
        return
    # a failure far off (or no result: None) is drawn at 2
    shares = [2.0 if case["error_to_tolerance"] is None else min(case["error_to_tolerance"], 2.0) for case in cases]
    ax.barh(range(len(cases)), shares, color=["tab:green" if case["passed"] else "tab:red" for case in cases])
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(cases)), [case["name"] for case in cases], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 2.05)
    ax.set_xlabel("worst error / tolerance (pass <= 1)")
    ax.set_title(f"operator on {operator.get('device')}: {sum(c['passed'] for c in cases)}/{len(cases)} cases")


def _speed_panels(ttft_ax, throughput_ax, speed: dict) -> None:
    names = speed.get("backends")
    if not names or not speed.get("ttft"):
        for ax in (ttft_ax, throughput_ax):
            ax.text(0.5, 0.5, "speed not measured", ha="center", transform=ax.transAxes)
        return
    lengths = list(speed["ttft"])
    for i, role in enumerate(("pfa", "default")):
        ttft_ax.bar([x + (i - 0.5) * 0.4 for x in range(len(lengths))],
                    [speed["ttft"][length][role] for length in lengths], 0.4, label=names[role])
    ttft_ax.set_xticks(range(len(lengths)),
                       [f"{length}\n{speed['ttft'][length]['ratio']:.2f}x" for length in lengths])
    ttft_ax.set_xlabel("prompt tokens (PFA speed-up)")
    ttft_ax.set_ylabel("seconds (best of the runs)")
    ttft_ax.set_title("time to first token")
    ttft_ax.legend()
    run = speed.get("throughput")
    if run:
        throughput_ax.bar([0, 1], [run["pfa"], run["default"]], color=["C0", "C1"])
        throughput_ax.set_xticks([0, 1], [names["pfa"], names["default"]])
        throughput_ax.set_xlabel(f"{run['workload']} tokens in/out")
        throughput_ax.set_ylabel("tokens/s (prompt + output)")
        throughput_ax.set_title(f"prefill-heavy: {run['ratio']:.2f}x")

"""Checks vllm-pfa on this machine, end to end, and says PASS or FAIL:

    python -m vllm_pfa.check [--model DIR] [--dtype float32|bfloat16|float16] [--out DIR] [--quick]

1. operator: the spec's cases (every layout, MHA/GQA/MQA, sparse modes 0-4, actual lengths shorter than the tensors,
   band windows, pse, the int8 paths) through `npu_prompt_flash_attention` on this machine's device (an NPU: torch_npu;
   else the package's CPU implementation), each compared with the exact reference on CPU at the dtype's tolerance;
   a sample of the spec's invalid inputs, each of which must be refused.
2. backend: the model (default: the embedded SmolLM2-135M-Instruct) run with PFA and with the platform's default
   backend: greedy tokens equal (a divergence only at a near tie), prompt log-probabilities within the dtype's
   bound, PFA selected, and prefill through PFA (its counters).
3. speed: time to first token per prompt length and prefill-heavy throughput, PFA against the default backend, as
   ratios measured in this run. Informational (INFO, or WARN below 0.9x) unless `--speed-min` makes them a check:
   on a CPU the ratio says more about the machine than about the backend.

Progress goes to stderr; the verdict table to stdout; check.json, check.png (with matplotlib) and each engine's raw
results to --out. The exit status is 1 when any check fails (correctness, refusals, selection; speed only with
--speed-min), 0 otherwise.

For the check's own tests, VLLM_PFA_CHECK_FAULT=operator corrupts every operator result and
VLLM_PFA_CHECK_FAULT=no-pfa runs the default backend where PFA should run: either must turn the verdict red.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from vllm_pfa.check_engine import (EngineConfig, correctness_rows, selection_rows, spawn_engine, speed_report,
                                   speed_rows)
from vllm_pfa.check_env import environment, operator_device, progress, summary
from vllm_pfa.check_operator import corrupt_result, run_operator_check
from vllm_pfa.check_report import FAIL, PASS, Row, format_table, verdict, write_json, write_png

SECTIONS = ("operator", "backend", "speed")
DEFAULT_MODEL = "smollm2-135m-instruct"
FAULT_ENV = "VLLM_PFA_CHECK_FAULT"
FAULTS = ("operator", "no-pfa")
ENGINE_TIMEOUT_S = {True: 900, False: 3600}  # per engine, quick and full


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_pfa.check",
                                     description=__doc__.splitlines()[0].rstrip(":") + ".",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[4:]))
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a local checkpoint directory, or an embedded model's name (default: %(default)s; "
                             "`python -m vllm_pfa.model_builder --help` lists them)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="the engines' dtype (default: float32 on CPU, bfloat16 on an NPU, where PFA has no "
                             "float32)")
    parser.add_argument("--out", type=Path, default=Path("vllm_pfa_check"),
                        help="directory for check.json, check.png and the engines' raw results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the short run (CI): fewer operator cases, prompts up to 1,100 tokens, TTFT at 256 and "
                             "1,024 tokens; the full run adds long operator cases, TTFT at 1k/4k/16k where the model "
                             "allows, and more tokens")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this part (repeatable; default: all)")
    parser.add_argument("--speed-min", type=float, metavar="RATIO",
                        help="fail when a PFA speed-up over the default backend is below RATIO (default: speed is "
                             "reported, not checked)")
    parser.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                        help="each engine's share of device memory (default: 0.3 on CPU, 0.8 on an NPU); the two "
                             "engines run one after the other")
    parser.add_argument("--verbose", action="store_true", help="keep vLLM's INFO log")
    return parser.parse_args(argv)


def resolve_model(name: str) -> Path:
    """A checkpoint directory as given, or an embedded model built on first use (the converted SmolLM2 takes about a
    minute once)."""
    from vllm_pfa.model_builder import SPECS, build_model
    from vllm_pfa.pretrained import PRETRAINED

    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name in SPECS or name in PRETRAINED:
        progress(f"model {name}: building or reusing its checkpoint")
        return build_model(name)
    raise FileNotFoundError(f"--model {name}: not a directory, nor an embedded model "
                            f"({', '.join([*SPECS, *PRETRAINED])})")


def check_engines(args: argparse.Namespace, dtype: str, sections: list[str], fault: str | None,
                  gpu_memory_utilization: float) -> tuple[list[Row], dict, dict | None]:
    """The backend and speed parts: PFA's engine, then the default one, each in its own process."""
    correctness = "backend" in sections
    try:
        model = str(resolve_model(args.model))
    except Exception as exc:  # noqa: BLE001 - reported as the failed check it is
        return [Row("backend: model", FAIL, f"{type(exc).__name__}: {exc}")], {}, None
    runs = {}
    for role, backend in (("pfa", None if fault == "no-pfa" else "PFA"), ("default", None)):
        config = EngineConfig(model=model, backend=backend, dtype=dtype, quick=args.quick, correctness=correctness,
                              speed="speed" in sections, gpu_memory_utilization=gpu_memory_utilization)
        runs[role] = spawn_engine(config, args.out / f"engine_{role}.json", ENGINE_TIMEOUT_S[args.quick])
    report = dict(model=model, engines={role: _summary(run) for role, run in runs.items()})
    errors = [f"{role}: {run['error']}" for role, run in runs.items() if "error" in run]
    if errors:
        return [Row("backend: engines ran", FAIL, "; ".join(errors))], report, None
    rows = []
    if correctness:
        rows += selection_rows(runs["pfa"], runs["default"]) + correctness_rows(runs["pfa"], runs["default"], dtype)
    speed = speed_report(runs["pfa"], runs["default"]) if "speed" in sections else None
    if speed is not None:
        rows += speed_rows(speed, args.speed_min)
    return rows, report, speed


def _summary(run: dict) -> dict:
    """An engine's results without the long arrays (they stay in its engine_*.json)."""
    if "correctness" not in run:
        return run
    correctness = dict(run["correctness"])
    correctness.pop("prompt_logprobs")
    correctness["generations"] = [{k: v for k, v in g.items() if k != "top_logprobs"}
                                  for g in correctness["generations"]]
    return dict(run, correctness=correctness)


def _quiet_vllm(verbose: bool) -> None:
    """vLLM's INFO lines (every engine's start-up) would bury the check's progress: WARNING and above, here and in
    the engines' processes, unless the user chose a level."""
    if verbose or "VLLM_LOGGING_LEVEL" in os.environ:
        return
    os.environ["VLLM_LOGGING_LEVEL"] = "WARNING"
    logging.getLogger("vllm").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    fault = os.environ.get(FAULT_ENV) or None
    if fault not in (None, *FAULTS):
        raise SystemExit(f"{FAULT_ENV}={fault}: must be one of {', '.join(FAULTS)}")
    _quiet_vllm(args.verbose)
    sections = args.only or list(SECTIONS)
    device = operator_device()
    on_npu = device.type == "npu"
    dtype = args.dtype or ("bfloat16" if on_npu else "float32")
    gpu_memory_utilization = args.gpu_memory_utilization or (0.8 if on_npu else 0.3)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    rows: list[Row] = []
    report: dict = dict(settings=dict(mode="quick" if args.quick else "full", dtype=dtype, model_name=args.model,
                                      sections=sections, speed_min=args.speed_min, fault=fault,
                                      gpu_memory_utilization=gpu_memory_utilization),
                        environment=env, operator=None, backend=None, speed=None)
    if fault:
        progress(f"TEST HOOK {FAULT_ENV}={fault}: this run is made to fail")
    if "operator" in sections:
        progress(f"operator: spec cases and invalid inputs on {device}")
        operator_rows, report["operator"] = run_operator_check(
            device, args.quick, corrupt_result if fault == "operator" else None)
        rows += operator_rows
    if "backend" in sections or "speed" in sections:
        engine_rows, report["backend"], report["speed"] = check_engines(args, dtype, sections, fault,
                                                                       gpu_memory_utilization)
        rows += engine_rows
    report.update(verdict=verdict(rows), rows=rows, duration_s=time.time() - started)
    exit_status = 0 if report["verdict"] == PASS else 1
    report["exit_status"] = exit_status
    write_json(args.out / "check.json", report)
    png_problem = write_png(args.out / "check.png", report)
    print(f"vllm-pfa check ({report['settings']['mode']}, {dtype}, model {args.model}, operator on {device}"
          f"{', TEST HOOK ' + fault if fault else ''}) in {report['duration_s']:.0f} s")
    print("\n".join(f"  {line}" for line in summary(env)))
    print(format_table(rows, color=sys.stdout.isatty()))
    written = [str(args.out / "check.json")] + ([] if png_problem else [str(args.out / "check.png")])
    print(f"wrote {', '.join(written)}" + (f" ({png_problem})" if png_problem else ""))
    return exit_status


if __name__ == "__main__":
    sys.exit(main())

"""The fuzz tests' subprocess harness: cases that reach native code run in a child interpreter that loops over them
and prints one JSON report, so a crash fails the test that reads it instead of killing pytest, and names the case it
died in (the child writes each case to `current` before running it)."""

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def run_child(script: str, examples: int, current: Path) -> dict:
    """`script`'s child part run with `examples` cases; its report, or the test failed with the case it died in."""
    command = [sys.executable, script, "--examples", str(examples), "--current", str(current)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(script))
    if proc.returncode != 0:
        last = current.read_text() if current.exists() else "none"
        pytest.fail(f"{os.path.basename(script)}: the fuzz subprocess exited with {proc.returncode} during case {last}"
                    f"\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(description: str, child: Callable[[int, str], None]) -> None:
    """The child's command line: `--examples N --current PATH`, then `child(N, PATH)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--examples", type=int, required=True)
    parser.add_argument("--current", required=True)
    args = parser.parse_args()
    child(args.examples, args.current)

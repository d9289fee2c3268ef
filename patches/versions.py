"""The installed stack, compared by release as vllm-ascend compares it, and the stacks each patch is verified on.

Releases, not version strings: vLLM built with `VLLM_TARGET_DEVICE=empty` (vllm-ascend's images and source install)
reports `0.30.0+empty`, the CPU wheel's distribution `0.32.0+cpu`; the local segment is a build artifact
(`vllm_ascend.utils.vllm_version_is` strips it too). A dev build (`0.30.1.dev12+g0123abc`) is its own release unless
`VLLM_VERSION` says which release it is, the override vllm-ascend honours for the same builds.
"""

import importlib.metadata
import importlib.util
import os

from packaging.version import InvalidVersion, Version

# Opt-in to run PFA on a stack it was not verified on (a warning instead of a start-up error).
ALLOW_UNVERIFIED_ENV = "VLLM_PFA_ALLOW_UNVERIFIED"
# vllm-ascend's override of vLLM's version for dev builds (vllm_ascend/envs.py).
VLLM_VERSION_ENV = "VLLM_VERSION"


def release(version: str | None) -> str | None:
    """The public release of a PEP 440 version (`0.30.0+empty` -> `0.30.0`); None where it is not one."""
    if version is None:
        return None
    try:
        return Version(version).public
    except InvalidVersion:
        return None


def vllm_release() -> str | None:
    """vLLM's release as vllm-ascend reads it: `VLLM_VERSION` if set, else `vllm.__version__`."""
    override = os.environ.get(VLLM_VERSION_ENV)
    if override:
        return release(override)
    import vllm

    return release(getattr(vllm, "__version__", None))


def vllm_ascend_installed() -> bool:
    return importlib.util.find_spec("vllm_ascend") is not None


def vllm_ascend_release() -> str | None:
    try:
        return release(importlib.metadata.version("vllm-ascend"))
    except importlib.metadata.PackageNotFoundError:
        return None


def allow_unverified() -> bool:
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def describe(installed: dict[str, str | None]) -> str:
    """`vLLM 0.30.0, vllm-ascend 0.30.0rc2` (`unknown` for a version that is not a PEP 440 release)."""
    return ", ".join(f"{name} {version or 'unknown'}" for name, version in installed.items())


def describe_verified(verified: tuple[dict[str, str], ...]) -> str:
    return "; ".join(describe(stack) for stack in verified)

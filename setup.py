"""Builds the native CPU prefill kernel (vllm_pfa._C) where it can be built; metadata is in setup.cfg.

The extension is built only on x86-64, with a C++ compiler, against a torch that is importable in the build
environment (`pip install --no-build-isolation`, so that it matches the torch it will run with), and unless
VLLM_PFA_BUILD_NATIVE=0. Anywhere else (an Ascend host on aarch64, an isolated build without torch) the package
installs without it and `vllm_pfa.ops.native_kernel` logs once which CPU route it uses instead. Only the kernel
section is compiled for AVX-512 (a target pragma in the source), so the module loads on any x86-64 CPU and the CPU
is checked at run time.
"""

import importlib.util
import os
import platform
import shutil
import sys

from setuptools import setup

SOURCES = ["vllm_pfa/csrc/bindings.cpp", "vllm_pfa/csrc/prefill_attention.cpp", "vllm_pfa/csrc/paged_kv_gather.cpp",
           "vllm_pfa/csrc/fma_peak.cpp", "vllm_pfa/csrc/amx_products.cpp",
           "vllm_pfa/csrc/output_memory.cpp", "vllm_pfa/csrc/operator_call.cpp",
           "vllm_pfa/csrc/argument_signature.cpp"]


def _why_not_native() -> str | None:
    """None if the native extension can be built here, else the reason it is skipped."""
    if os.environ.get("VLLM_PFA_BUILD_NATIVE", "1") == "0":
        return "VLLM_PFA_BUILD_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 (AVX-512) code and this machine is {platform.machine()}"
    if importlib.util.find_spec("torch") is None:
        return "torch is not importable in the build environment (build with --no-build-isolation)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


def _native_extension() -> dict:
    reason = _why_not_native()
    if reason is not None:
        print(f"vllm-pfa: not building the native CPU kernel: {reason}", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        "vllm_pfa._C", SOURCES,
        # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without it the kernel runs on 1 thread.
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


setup(**_native_extension())

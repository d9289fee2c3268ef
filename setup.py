"""Builds the native CPU prefill kernel (vllm_pfa._C) with torch's C++ extension machinery; metadata is in setup.cfg.

Only the kernel section is compiled for AVX-512 (a target pragma in the source), so the module loads on any
x86-64 CPU and `vllm_pfa.ops.native_kernel` checks at run time whether this CPU can use it.
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "vllm_pfa._C",
            ["vllm_pfa/csrc/bindings.cpp", "vllm_pfa/csrc/prefill_attention.cpp",
             "vllm_pfa/csrc/paged_kv_gather.cpp"],
            # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; without it the kernel runs on 1 thread.
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# vLLM's CPU attention kernel uses AMX tiles on CPUs that have them without asking Linux for the tile state (a process
# must, once: arch_prctl ARCH_REQ_XCOMP_PERM), and gets SIGILL otherwise. In an engine the model's first bf16 matmul
# (oneDNN) has asked before attention runs; unit tests that call the kernel directly ask here, as oneDNN would.
if hasattr(torch._C._cpu, "_init_amx"):
    torch._C._cpu._init_amx()

# The Ascend contract suite runs in processes of its own, started by test_ascend_contract.py.
collect_ignore = ["ascend_contract"]


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="examples per part of tests/test_op_fuzz.py (default: its quick CI setting)")

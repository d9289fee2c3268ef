import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# The Ascend contract suite runs in processes of its own, started by test_ascend_contract.py.
collect_ignore = ["ascend_contract"]


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="examples per part of tests/test_op_fuzz.py (default: its quick CI setting)")

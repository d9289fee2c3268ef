"""End to end, tensor parallel: the shared scenarios with tensor_parallel_size=2 on a 6-query / 2-kv-head model
(3 / 1 heads per rank), PFA against CPU_ATTN; each rank bound to a core of its own."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
GENERATE_TP = Path(__file__).parent / "e2e" / "generate_tp.py"


def _generate_tp(backend: str, tmp_path: Path) -> tuple[dict, str]:
    """Greedy tokens per scenario, and the run's log (DEBUG: the ranks' PFA step lines)."""
    out = tmp_path / f"{backend}.json"
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_LOGGING_LEVEL="DEBUG")
    proc = subprocess.run([sys.executable, str(GENERATE_TP), backend, str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def test_tensor_parallel_greedy_tokens_match_default_backend(tmp_path):
    pfa, log = _generate_tp("PFA", tmp_path)
    default, _ = _generate_tp("CPU_ATTN", tmp_path)
    assert set(pfa) == set(default) and len(pfa) == 11
    for name in default:
        assert pfa[name] == default[name], name
    assert "Using the PFA attention backend" in log
    for rank in (0, 1):  # both ranks ran their heads' prefills through PFA
        prefill_tokens = re.findall(rf"Worker_TP{rank} .*PFA step: \d+ decode tokens, (\d+) prefill tokens", log)
        assert sum(map(int, prefill_tokens)) > 0, rank

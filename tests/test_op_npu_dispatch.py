"""Contract test: on an NPU tensor the operator calls torch_npu.npu_prompt_flash_attention with the same arguments.

No NPU exists here, so a recording stand-in takes torch_npu's place and the device check is forced.
"""

import sys
import types

import torch

from vllm_pfa.ops import api, compressed_causal_mask


def test_npu_tensors_dispatch_to_torch_npu(monkeypatch):
    calls = []
    sentinel = torch.empty(0)
    stand_in = types.ModuleType("torch_npu")
    stand_in.npu_prompt_flash_attention = lambda *args, **kwargs: calls.append((args, kwargs)) or sentinel
    monkeypatch.setitem(sys.modules, "torch_npu", stand_in)
    monkeypatch.setattr(api, "runs_on_npu", lambda query: True)
    q = torch.zeros(1, 4, 8, 16, dtype=torch.float16)
    mask = compressed_causal_mask()
    result = api.npu_prompt_flash_attention(q, q, q, num_heads=4, input_layout="BNSD", sparse_mode=3,
                                            atten_mask=mask, actual_seq_lengths=torch.tensor([5]),
                                            actual_seq_lengths_kv=[8], scale_value=0.25)
    assert result is sentinel
    (args, kwargs), = calls
    assert all(a is q for a in args)
    assert kwargs["atten_mask"] is mask and kwargs["sparse_mode"] == 3 and kwargs["num_heads"] == 4
    assert kwargs["actual_seq_lengths"] == [5] and kwargs["actual_seq_lengths_kv"] == [8]
    assert kwargs["input_layout"] == "BNSD" and kwargs["scale_value"] == 0.25
    assert kwargs["pre_tokens"] == 2147483647 and kwargs["next_tokens"] == 0 and kwargs["num_key_value_heads"] == 0
    assert set(kwargs) == {"pse_shift", "padding_mask", "atten_mask", "actual_seq_lengths", "deq_scale1",
                           "quant_scale1", "deq_scale2", "quant_scale2", "quant_offset2", "num_heads", "scale_value",
                           "pre_tokens", "next_tokens", "input_layout", "num_key_value_heads",
                           "actual_seq_lengths_kv", "sparse_mode"}


def test_cpu_tensors_do_not_touch_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # importing it would fail
    q = torch.randn(1, 2, 4, 16)
    assert api.npu_prompt_flash_attention(q, q, q, num_heads=2, input_layout="BNSD").shape == q.shape

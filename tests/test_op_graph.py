"""Graph mode: the custom op's fake implementation and torch.compile(fullgraph=True)."""

import math

import pytest
import torch

from pfa_cases import make_qkv
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, npu_trans_quant_param


class Attention(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return npu_prompt_flash_attention(q, k, v, **self.kwargs) * 1.0


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_compile_fullgraph_matches_eager(layout):
    torch._dynamo.reset()
    q, k, v = make_qkv(layout, 2, 4, 2, 16, 24, 32, torch.bfloat16)
    module = Attention(num_heads=4, num_key_value_heads=2, input_layout=layout, scale_value=1 / math.sqrt(32),
                       sparse_mode=3, atten_mask=compressed_causal_mask(), actual_seq_lengths=[16, 9],
                       actual_seq_lengths_kv=[24, 20])
    eager = module(q, k, v)
    compiled = torch.compile(module, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)


def test_fake_mirrors_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        ("BNSD_BSND", torch.float16, {}, (2, 8, 4, 32), torch.float16),
        ("BSH", torch.bfloat16, {"quant_scale2": torch.ones(1)}, (2, 8, 128), torch.int8),
    ]
    for layout, dtype, extra, shape, out_dtype in cases:
        q, k, v = make_qkv(layout, 2, 4, 4, 8, 8, 32, dtype)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
            out = torch.ops.vllm_pfa.npu_prompt_flash_attention(fq, fk, fv, num_heads=4, input_layout=layout, **extra)
        assert tuple(out.shape) == shape and out.dtype == out_dtype
    q, k, v = make_qkv("BSND", 1, 2, 2, 4, 4, 32, torch.int8)
    int8_scales = dict(deq_scale1=npu_trans_quant_param(torch.tensor([0.01])), quant_scale1=torch.tensor([50.0]),
                       deq_scale2=torch.tensor([0.01]))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = torch.ops.vllm_pfa.npu_prompt_flash_attention(mode.from_tensor(q), mode.from_tensor(k),
                                                            mode.from_tensor(v), num_heads=2, input_layout="BSND",
                                                            **int8_scales)
    assert out.dtype == torch.float16 and tuple(out.shape) == (1, 4, 2, 32)


def test_opcheck():
    q, k, v = make_qkv("BSND", 2, 4, 2, 8, 12, 32, torch.float32)
    torch.library.opcheck(
        torch.ops.vllm_pfa.npu_prompt_flash_attention.default, (q, k, v),
        dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", sparse_mode=3,
             atten_mask=compressed_causal_mask(), actual_seq_lengths=[8, 3]),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_compile_reports_invalid_arguments():
    torch._dynamo.reset()
    q, k, v = make_qkv("BSND", 1, 4, 2, 8, 8, 32, torch.float32)
    module = Attention(num_heads=4, num_key_value_heads=3, input_layout="BSND")
    with pytest.raises(Exception, match="num_key_value_heads"):
        torch.compile(module, fullgraph=True)(q, k, v)


def _banded(q, k, v, lengths, pre_tokens, sparse_mode):
    return npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BNSD", atten_mask=compressed_causal_mask(),
                                      actual_seq_lengths=lengths, pre_tokens=pre_tokens, next_tokens=1,
                                      sparse_mode=sparse_mode) * 1.0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_changing_int_arguments(backend):
    """Dynamo passes a changed int as a SymInt on the recompile: validation takes it, every call stays exact.

    Changed one at a time, then back: lengths, pre_tokens, sparse_mode; then an invalid value, which must still
    be rejected (the symbolic checks guard on the values)."""
    torch._dynamo.reset()
    q, k, v = make_qkv("BNSD", 2, 2, 2, 12, 16, 16, torch.float32)
    compiled = torch.compile(_banded, fullgraph=True, backend=backend)
    for lengths, pre_tokens, sparse_mode in [([12, 5], 4, 4), ([7, 3], 4, 4), ([9, 12], 4, 4), ([9, 12], 2, 4),
                                             ([9, 12], 6, 4), ([9, 12], 6, 3), ([12, 1], 6, 2), ([12, 5], 4, 4)]:
        actual = compiled(q, k, v, lengths, pre_tokens, sparse_mode)
        torch.testing.assert_close(actual, _banded(q, k, v, lengths, pre_tokens, sparse_mode), rtol=0, atol=0)
    with pytest.raises(Exception, match=r"actual_seq_lengths\[0\] = 13 is invalid"):
        compiled(q, k, v, [13, 5], 4, 4)
    with pytest.raises(Exception, match="sparse_mode = 6 is out of range"):
        compiled(q, k, v, [12, 5], 4, 6)

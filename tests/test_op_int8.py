"""The int8 path against a direct transcription of the A2/A3 formulas, and the uint64 scale packing."""

import struct

import pytest
import torch

from pfa_cases import make_qkv
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, npu_trans_quant_param


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _round_half_even_sat(x: float) -> int:
    return max(-128, min(127, round(x)))  # Python's round() is half-to-even


def test_trans_quant_param_packs_like_torch_npu():
    scales = torch.tensor([0.0123, 1.0, 3.5e-4])
    packed = npu_trans_quant_param(scales)
    assert packed.dtype == torch.uint64
    for value, word in zip(scales.tolist(), packed.view(torch.int64).tolist()):
        assert word == (_f32_bits(value) & 0xFFFFE000) | (1 << 46)
    with_offset = npu_trans_quant_param(torch.tensor([0.5]), torch.tensor([-3.0]))
    assert with_offset.view(torch.int64).item() == (_f32_bits(0.5) & 0xFFFFE000) | ((-3 & 0x1FF) << 37) | (1 << 46)


def _low_word(packed: torch.Tensor) -> torch.Tensor:
    return packed.view(torch.int64) & 0xFFFFFFFF


def test_trans_quant_param_round_mode():
    """round_mode 1 rounds a scale to its top 19 bits (a 10-bit mantissa) to nearest, ties to even, which in float16's
    normal range is float16's own rounding; 0 (the default) and None truncate."""
    torch.manual_seed(0)
    ties = [1 + 2**-11, 1 + 3 * 2**-11, -(1 + 3 * 2**-11), 1 + 2**-11 + 2**-23]
    scales = torch.cat([torch.exp2(torch.empty(4000).uniform_(-14, 15)), torch.tensor(ties)])
    float16_rounded = scales.half().float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(_low_word(npu_trans_quant_param(scales, round_mode=1)), float16_rounded)
    truncated = scales.view(torch.int32).to(torch.int64) & 0xFFFFE000
    for mode in ({}, {"round_mode": 0}, {"round_mode": None}):
        assert torch.equal(_low_word(npu_trans_quant_param(scales, **mode)), truncated)
    largest = torch.tensor([torch.finfo(torch.float32).max, float("inf"), float("nan")])
    words = _low_word(npu_trans_quant_param(largest, None, 1)).tolist()
    assert words[:2] == [0x7F800000, 0x7F800000] and words[2] == _f32_bits(float("nan")) & 0xFFFFE000
    with pytest.raises(ValueError, match=r"round_mode = 2 is invalid: must be 0 .* or 1"):
        npu_trans_quant_param(scales, round_mode=2)
    with pytest.raises(TypeError, match=r"round_mode = True is invalid: must be an int"):
        npu_trans_quant_param(scales, round_mode=True)


def transcription(q, k, v, scale, deq1, qs1, deq2, causal, qs2=None, qo2=None):
    """BNSD int8, one element at a time:
    S = fp16(int32(QK) * deq1) * scale; P8 = rne(exp(S - max) * qs1); O = fp16(int32(P8 V) * deq2) / sum."""
    batch, heads, sq, dim = q.shape
    kv_heads, skv = k.shape[1], k.shape[2]
    out = torch.zeros(batch, heads, sq, dim, dtype=torch.float32)
    for b in range(batch):
        for n in range(heads):
            kn = n // (heads // kv_heads)
            for i in range(sq):
                cols = [j for j in range(skv) if not causal or j <= i + skv - sq]
                if not cols:
                    continue
                s = [float(torch.tensor(int(q[b, n, i].int() @ k[b, kn, j].int()) * deq1).half()) * scale
                     for j in cols]
                m = max(s)
                p = [torch.exp(torch.tensor(x - m)).item() for x in s]
                p8 = [_round_half_even_sat(x * qs1) for x in p]
                for d in range(dim):
                    acc = sum(p8[c] * int(v[b, kn, j, d]) for c, j in enumerate(cols))
                    out[b, n, i, d] = float(torch.tensor(acc * deq2).half()) / sum(p)
    out = out.half().float()
    if qs2 is None:
        return out.half()
    qs2 = qs2.reshape(1, heads, 1, dim) if qs2.numel() > 1 else qs2.reshape(())
    offset = 0.0 if qo2 is None else (qo2.reshape(1, heads, 1, dim) if qo2.numel() > 1 else qo2.reshape(()))
    return torch.round(out * qs2 + offset).clamp(-128, 127).to(torch.int8)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("output", ["fp16", "per-tensor", "per-channel"])
def test_int8_matches_transcription(causal, packed, output):
    q, k, v = make_qkv("BNSD", 2, 4, 2, 5, 7, 32, torch.int8, seed=3)
    scale, deq1, qs1, deq2 = 1 / 32 ** 0.5, 0.004, 120.0, 0.002
    pack = npu_trans_quant_param if packed else (lambda t: t)
    kwargs = dict(num_heads=4, num_key_value_heads=2, input_layout="BNSD", scale_value=scale,
                  deq_scale1=pack(torch.tensor([deq1])), quant_scale1=torch.tensor([qs1]),
                  deq_scale2=pack(torch.tensor([deq2])))
    if causal:
        kwargs.update(sparse_mode=3, atten_mask=compressed_causal_mask())
    qs2 = qo2 = None
    if output == "per-tensor":
        qs2, qo2 = torch.tensor([20.0]), torch.tensor([1.0])
    elif output == "per-channel":
        qs2, qo2 = torch.rand(4, 32) * 40, torch.randint(-3, 4, (4, 32)).float()
    if qs2 is not None:
        kwargs.update(quant_scale2=qs2, quant_offset2=qo2)
    # packing keeps the top 19 bits of the float32 scale: the transcription uses the value the NPU sees
    used = (lambda x: _from_bits(_f32_bits(x) & 0xFFFFE000)) if packed else (lambda x: x)
    expected = transcription(q, k, v, scale, used(deq1), qs1, used(deq2), causal, qs2, qo2)
    actual = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert actual.dtype == expected.dtype
    if expected.dtype == torch.int8:
        assert (actual.int() - expected.int()).abs().max() <= 1  # one rounding step at most
        assert (actual == expected).float().mean() > 0.97
    else:
        torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD_BSND"])
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_float_input_int8_output(layout, dtype, scale_dtype):
    q, k, v = make_qkv(layout, 1, 2, 2, 6, 6, 16, dtype, seed=1)
    base = npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout=layout, scale_value=0.25).float()
    scale2 = torch.linspace(10, 60, 32).to(scale_dtype)
    offset2 = torch.full((32,), 2.0).to(scale_dtype)
    out = npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout=layout, scale_value=0.25,
                                     quant_scale2=scale2, quant_offset2=offset2)
    assert out.dtype == torch.int8 and out.shape == base.shape
    channel = scale2.float().reshape(2, 16)
    if layout == "BSH":
        expected = base * scale2.float() + 2.0
    else:  # BSND-shaped output: channels are (n, d)
        expected = base * channel + 2.0
    expected = torch.round(expected).clamp(-128, 127)
    assert (out.float() - expected).abs().max() <= 1


@pytest.mark.parametrize("output", ["fp16", "int8"])
def test_int8_batch_without_keys_gives_zero_rows(output):
    """actual_seq_lengths_kv may be 0 (the spec's range is [0, S]): that batch's rows keep no key and are 0."""
    q, k, v = make_qkv("BNSD", 2, 2, 1, 4, 6, 32, torch.int8, seed=5)
    kwargs = dict(num_heads=2, num_key_value_heads=1, input_layout="BNSD",
                  deq_scale1=npu_trans_quant_param(torch.tensor([0.01])), quant_scale1=torch.tensor([100.0]),
                  deq_scale2=npu_trans_quant_param(torch.tensor([0.01])))
    if output == "int8":
        kwargs.update(quant_scale2=torch.tensor([30.0]), quant_offset2=torch.tensor([2.0]))
    out = npu_prompt_flash_attention(q, k, v, actual_seq_lengths_kv=[6, 0], **kwargs)
    alone = npu_prompt_flash_attention(q[:1], k[:1], v[:1], **kwargs)
    assert torch.equal(out[:1], alone)
    zero = torch.zeros_like(out[1]) if output == "fp16" else torch.full_like(out[1], 2)  # 0 * scale + offset
    assert torch.equal(out[1], zero)

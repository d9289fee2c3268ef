"""int8 quantization parameters of PFA: the uint64 packing of dequant scales and the output quantization."""

import torch

from vllm_pfa.ops.validation import check_int, fail

_SCALE_BITS = 0xFFFFE000  # the bits the NPU keeps of a float32 dequant scale: sign, exponent, 10 mantissa bits
_DROPPED_BITS = 13
_OFFSET_SHIFT = 37  # a 9-bit signed offset sits at bits [37, 46)
_FORMAT_FLAG = 1 << 46


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None,
                          round_mode: int | None = 0) -> torch.Tensor:
    """Packs float32 dequant scales (and optional int offsets) into uint64, as torch_npu.npu_trans_quant_param does:
    a scale keeps its top 19 bits, truncated (round_mode 0, or None) or rounded to nearest, ties to even (1), as
    CANN's aclnnTransQuantParamV3 documents."""
    mode = 0 if round_mode is None else check_int("round_mode", round_mode)
    if mode not in (0, 1):
        raise fail("round_mode", mode, "must be 0 (truncate to 19 bits) or 1 (round to nearest, ties to even)")
    scale32 = scale.to(torch.float32).contiguous()
    bits = scale32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if mode == 1:  # half of the dropped bits' unit, less one unless the kept last bit is odd: ties go to even
        rounded = bits + ((1 << (_DROPPED_BITS - 1)) - 1) + ((bits >> _DROPPED_BITS) & 1)
        # NaN and inf, which CANN's documentation excludes, are truncated in both modes (rounding could carry a NaN
        # out of the sign bit)
        bits = torch.where(torch.isfinite(scale32), rounded, bits)
    packed = (bits & _SCALE_BITS) | _FORMAT_FLAG
    if offset is not None:
        offset9 = torch.round(offset.to(torch.float32)).clamp(-256, 255).to(torch.int64) & 0x1FF
        packed = packed | (offset9 << _OFFSET_SHIFT)
    return packed.view(torch.uint64)


def deq_scale_value(deq_scale: torch.Tensor) -> float:
    """The float32 scale a per-tensor deq_scale stands for (uint64 packed, or float32 as is)."""
    if deq_scale.dtype == torch.uint64:
        bits = int(deq_scale.reshape(-1).view(torch.int64)[0]) & _SCALE_BITS
        return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])
    return float(deq_scale.reshape(-1)[0])


def saturate_int8(values: torch.Tensor) -> torch.Tensor:
    """round-half-even then saturate to int8; NaN becomes 0 (a float-to-int cast of NaN is undefined)."""
    return torch.round(torch.nan_to_num(values, nan=0.0)).clamp(-128, 127).to(torch.int8)


def quantize_output(out_bnsd: torch.Tensor, quant_scale2: torch.Tensor, quant_offset2: torch.Tensor | None,
                    num_heads: int, head_dim: int) -> torch.Tensor:
    """int8 output: round_half_even(O * quant_scale2 + quant_offset2), per-tensor or per-channel (N*D ordered n, d)."""
    def per_channel(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32)
        return t.reshape(1, num_heads, 1, head_dim) if t.numel() > 1 else t.reshape(())
    out = out_bnsd.to(torch.float32) * per_channel(quant_scale2)
    if quant_offset2 is not None:
        out = out + per_channel(quant_offset2)
    return saturate_int8(out)

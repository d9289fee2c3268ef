"""int8 quantization parameters of PFA: the uint64 packing of dequant scales and the output quantization."""

import torch

_SCALE_BITS = 0xFFFFE000  # the mantissa bits the NPU keeps of a float32 dequant scale
_OFFSET_SHIFT = 37  # a 9-bit signed offset sits at bits [37, 46)
_FORMAT_FLAG = 1 << 46


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Packs float32 dequant scales (and optional int offsets) into uint64, as torch_npu.npu_trans_quant_param does."""
    bits = scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _SCALE_BITS
    packed = bits | _FORMAT_FLAG
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

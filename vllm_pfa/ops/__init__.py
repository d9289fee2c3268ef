"""The PFA operator: `npu_prompt_flash_attention` and its helpers."""

from vllm_pfa.ops.api import npu_prompt_flash_attention, reference_npu_prompt_flash_attention
from vllm_pfa.ops.masks import compressed_causal_mask
from vllm_pfa.ops.quant import npu_trans_quant_param

__all__ = [
    "compressed_causal_mask",
    "npu_prompt_flash_attention",
    "npu_trans_quant_param",
    "reference_npu_prompt_flash_attention",
]

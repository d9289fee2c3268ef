"""vllm-pfa: a vLLM attention backend that routes prefill through Ascend Prompt Flash Attention."""

from vllm_pfa.ops import npu_prompt_flash_attention, npu_trans_quant_param

__all__ = ["npu_prompt_flash_attention", "npu_trans_quant_param"]

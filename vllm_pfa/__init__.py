"""vllm-pfa: a vLLM attention backend that routes prefill through Ascend Prompt Flash Attention.

The backend name "PFA" is registered by vLLM's plugin entry points (see `vllm_pfa.plugin`), so vLLM selects it
with no import of this package.
"""

from vllm_pfa.ops import npu_prompt_flash_attention, npu_trans_quant_param

__all__ = ["npu_prompt_flash_attention", "npu_trans_quant_param"]

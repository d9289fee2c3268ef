"""vllm-pfa: a vLLM attention backend that routes prefill through Ascend Prompt Flash Attention."""

from vllm_pfa.ops import npu_prompt_flash_attention, npu_trans_quant_param


def _register_backend_name() -> None:
    # `LLM(..., attention_config={"backend": "PFA"})` parses the name before vLLM loads its plugins, so the name is
    # registered on import; the platform patches are applied by the plugin entry point in every vLLM process.
    try:
        from vllm_pfa.plugin import register_backend_name
    except ImportError:  # vLLM is not installed: the operator alone
        return
    register_backend_name()


_register_backend_name()

__all__ = ["npu_prompt_flash_attention", "npu_trans_quant_param"]

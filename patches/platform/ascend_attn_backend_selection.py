"""Make vllm-ascend's NPU platform honour `--attention-backend pfa`.

What: (1) `NPUPlatform.check_and_update_config` keeps a PFA selection through vllm-ascend's config fix-ups, and
    refuses it on a stack PFA is not verified on; (2) `NPUPlatform.get_attn_backend_cls` returns the PFA backend for
    Ascend (`vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend`) when PFA is selected, after checking the
    device.
Why: (1) vllm-ascend's `_fix_incompatible_config` (run by `check_and_update_config` since v0.14.0rc1) resets
    `attention_config.backend` to None ("Ascend NPU will use its registered plugin backend instead"), so the
    selection never reaches `get_attn_backend_cls`, and vllm-ascend's own backend would run for a user who asked for
    PFA; (2) that method maps (MLA, sparse, compress) to vllm-ascend's own backends and ignores the selected one.
How: (1) wraps `check_and_update_config`: all of vllm-ascend's fix-ups run unchanged, then a PFA selection they
    reset is put back (logged); (2) wraps `get_attn_backend_cls` (shared mechanism: `selection.patch_platform`).
    Any other selection, and every config without PFA, reaches vllm-ascend unchanged. PFA on a device the operator
    spec does not cover for vLLM's prefill (310P: fp16 only, actual_seq_lengths=None, sparse_mode=0, no GQA; A5: not
    listed) is refused at start-up, naming the device and the rule, instead of falling back to another backend; so
    is PFA with a quantized (C8 / MXFP8) KV cache, whose layers vllm-ascend hands to its own impls.
For: the stacks in VERIFIED_STACKS (releases compared as vllm-ascend compares them: `0.30.0+empty` is 0.30.0,
    `VLLM_VERSION` overrides a dev build's). Other stacks: only the refusal, unless VLLM_PFA_ALLOW_UNVERIFIED=1.
    Without vllm-ascend nothing is patched and nothing is said.
Remove when: vllm-ascend keeps a user-selected registered backend and resolves it in `get_attn_backend_cls`.
"""

from vllm_pfa.log import init_logger
from vllm_pfa_patches.platform.selection import BACKEND_NAME, Stack, is_pfa, patch_platform
from vllm_pfa.plugin import ASCEND_BACKEND_CLASS_PATH as PFA_ASCEND_BACKEND
from vllm_pfa_patches.versions import vllm_ascend_installed, vllm_ascend_release, vllm_release

logger = init_logger(__name__)

# vllm-ascend 0.30.0rc2 on its own paired vLLM (tests/ascend_contract runs on it: .venv-vllm030).
VERIFIED_STACKS = ({"vLLM": "0.30.0", "vllm-ascend": "0.30.0rc2"},)
# The operator spec covers vLLM's batched causal prefill on these products only.
SUPPORTED_DEVICES = ("A2", "A3")
DEVICE_RULES = {
    "_310P": ("Atlas inference series (310P)", "the PFA spec allows only float16, actual_seq_lengths=None, "
              "actual_seq_lengths_kv=None, sparse_mode=0, default pre/next tokens and num_key_value_heads=0 there, "
              "which cannot express vLLM's batched causal prefill over a paged cache"),
    "A5": ("Ascend 950 (A5)", "the PFA spec does not list this product; PFA is unverified there"),
}


def stack() -> Stack:
    return Stack("Ascend NPU", {"vLLM": vllm_release(), "vllm-ascend": vllm_ascend_release()}, VERIFIED_STACKS)


def check_device() -> None:
    """Raises, naming the device and the rule, where PFA cannot serve vLLM's prefill."""
    from vllm_ascend.device.device_config import get_ascend_device_type

    # The spec's product list, not a vllm-ascend capability, decides, so the device family is asked directly.
    device = get_ascend_device_type().name
    if device in SUPPORTED_DEVICES:
        return
    product, rule = DEVICE_RULES.get(device, (device, "the PFA spec does not list this product"))
    raise ValueError(f"The PFA attention backend cannot run on {product}: {rule}. Start without "
                     f"--attention-backend pfa to use vllm-ascend's own attention backend on this device.")


def refuse_quantized_kv_cache(vllm_config) -> None:
    """vllm-ascend's C8 (int8, from the checkpoint's quantization) and MXFP8 (`--kv-cache-dtype mxfp8`) KV caches
    replace a layer's impl with their own class when its weights are created, so PFA would silently leave every
    layer while its builder still planned PFA; PFA reads unquantized K/V only. Refused at start-up instead."""
    cache_dtype = vllm_config.cache_config.cache_dtype
    c8 = getattr(vllm_config.quant_config, "enable_c8_quant", False)
    if c8 or cache_dtype not in ("auto", "float16", "bfloat16"):
        what = "the checkpoint's C8 (int8) KV-cache quantization" if c8 else f"--kv-cache-dtype {cache_dtype}"
        raise ValueError(f"The PFA attention backend cannot run with {what}: PFA reads unquantized K/V, and "
                         f"vllm-ascend runs quantized KV caches through its own attention implementations. Start "
                         f"without --attention-backend pfa, or with an unquantized KV cache.")


def _after_config(vllm_config, selected) -> None:
    if not is_pfa(selected):
        return
    refuse_quantized_kv_cache(vllm_config)
    attention_config = vllm_config.attention_config
    if attention_config.backend is None:
        attention_config.backend = selected
        logger.info("vllm-pfa: keeping attention backend %s (vllm-ascend's config fix-ups reset it).", BACKEND_NAME)


def apply() -> bool:
    if not vllm_ascend_installed():
        return False  # not an Ascend installation: nothing to patch, nothing to say
    from vllm_ascend.platform import NPUPlatform

    return patch_platform(NPUPlatform, stack, PFA_ASCEND_BACKEND, check=check_device,
                          after_config=_after_config)

"""Make vllm-ascend's NPU platform honour `--attention-backend pfa`.

What: (1) `NPUPlatform.check_and_update_config` keeps a PFA selection through vllm-ascend's config fix-ups;
    (2) `NPUPlatform.get_attn_backend_cls` returns the PFA backend for Ascend
    (`vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend`) when PFA is selected, after checking the device.
Why: (1) vllm-ascend's `_fix_incompatible_config` (run by `check_and_update_config` since v0.14.0rc1) resets
    `attention_config.backend` to None ("Ascend NPU will use its registered plugin backend instead"), so the
    selection never reaches `get_attn_backend_cls`; (2) that method maps (MLA, sparse, compress) to vllm-ascend's own
    backends and ignores the selected one.
How: (1) wraps `check_and_update_config`: all of vllm-ascend's fix-ups run unchanged, then a PFA selection they
    reset is put back (logged); (2) wraps `get_attn_backend_cls` (shared mechanism:
    `selection.patch_backend_selection`). Any other selection, and every config without PFA, reaches vllm-ascend
    unchanged. PFA on a device the operator spec does not cover for vLLM's prefill (310P: fp16 only,
    actual_seq_lengths=None, sparse_mode=0, no GQA; A5: not listed) is refused at start-up, naming the device and
    the rule, instead of falling back to another backend.
For: the stacks in SUPPORTED_STACKS (verified by tests/ascend_contract against vllm-ascend's released source); any
    other vllm-ascend or vLLM is refused with one log line.
Remove when: vllm-ascend keeps a user-selected registered backend and resolves it in `get_attn_backend_cls`.
"""

import importlib.metadata
import importlib.util

import vllm

from vllm_pfa.log import init_logger
from vllm_pfa_patches.platform.selection import BACKEND_NAME, is_pfa, patch_backend_selection, wrap_classmethod

logger = init_logger(__name__)

# vllm-ascend release -> the vLLM releases it is verified with: its own pairing (0.30.0) and the vLLM this project
# runs on CPU (0.32.0), where the contract suite imports and exercises the release's source.
SUPPORTED_STACKS = {"0.30.0rc2": ("0.30.0", "0.32.0")}
PFA_ASCEND_BACKEND = "vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend"
# The operator spec covers vLLM's batched causal prefill on these products only.
SUPPORTED_DEVICES = ("A2", "A3")
DEVICE_RULES = {
    "_310P": ("Atlas inference series (310P)", "the PFA spec allows only float16, actual_seq_lengths=None, "
              "actual_seq_lengths_kv=None, sparse_mode=0, default pre/next tokens and num_key_value_heads=0 there, "
              "which cannot express vLLM's batched causal prefill over a paged cache"),
    "A5": ("Ascend 950 (A5)", "the PFA spec does not list this product; PFA is unverified there"),
}


def stack_supported(vllm_version: str, vllm_ascend_version: str) -> bool:
    if vllm_version in SUPPORTED_STACKS.get(vllm_ascend_version, ()):
        return True
    logger.warning(
        "vllm-pfa: not patching vllm-ascend %s with vLLM %s (verified stacks: %s); --attention-backend pfa will not "
        "be honoured on NPU.", vllm_ascend_version, vllm_version,
        "; ".join(f"vllm-ascend {a} with vLLM {', '.join(v)}" for a, v in SUPPORTED_STACKS.items()))
    return False


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


def _keep_pfa_through_config_fixups(platform_cls: type) -> None:
    def check_and_update_config(original, cls, vllm_config) -> None:
        attention_config = getattr(vllm_config, "attention_config", None)
        selected = getattr(attention_config, "backend", None)
        original(cls, vllm_config)
        if is_pfa(selected) and attention_config.backend is None:
            attention_config.backend = selected
            logger.info("vllm-pfa: keeping attention backend %s (vllm-ascend's config fix-ups reset it).",
                        BACKEND_NAME)

    wrap_classmethod(platform_cls, "check_and_update_config", check_and_update_config)


def apply() -> bool:
    if importlib.util.find_spec("vllm_ascend") is None:
        return False  # not an Ascend installation: nothing to patch
    if not stack_supported(vllm.__version__, importlib.metadata.version("vllm-ascend")):
        return False
    from vllm_ascend.platform import NPUPlatform

    _keep_pfa_through_config_fixups(NPUPlatform)
    return patch_backend_selection(NPUPlatform, PFA_ASCEND_BACKEND, check=check_device)

"""Make vllm-ascend's NPU platform honour `--attention-backend pfa`.

What: `vllm_ascend.platform.NPUPlatform.get_attn_backend_cls` returns the PFA backend for Ascend
    (`vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend`) when the selected backend is PFA.
Why: vllm-ascend ignores the selected backend and maps (MLA, sparse) to its own backends, so an out-of-tree
    backend can never be chosen on an NPU.
How: wraps the classmethod (shared mechanism: `selection.patch_backend_selection`); every other selection goes to
    the original unchanged. Applied only where vllm_ascend is installed.
For: vLLM 0.32.0 with a vllm-ascend whose attention builder has the `_build_backend_metadata` extension point and
    `metadata_cls` (what the PFA Ascend backend subclasses); any other vllm-ascend is refused with a log line.
Remove when: vllm-ascend resolves registered out-of-tree backends itself.
"""

import importlib.util

import vllm

from vllm_pfa.log import init_logger
from vllm_pfa_patches.platform.selection import patch_backend_selection, version_supported

logger = init_logger(__name__)

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
PFA_ASCEND_BACKEND = "vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend"


def apply() -> bool:
    if importlib.util.find_spec("vllm_ascend") is None:
        return False  # not an Ascend installation: nothing to patch
    if not version_supported("vllm", vllm.__version__, SUPPORTED_VLLM_VERSIONS):
        return False
    from vllm_ascend.attention.attention_v1 import AscendAttentionMetadataBuilder
    from vllm_ascend.platform import NPUPlatform

    if not (hasattr(AscendAttentionMetadataBuilder, "_build_backend_metadata")
            and hasattr(AscendAttentionMetadataBuilder, "metadata_cls")):
        logger.warning("vllm-pfa: this vllm-ascend's attention builder lacks the extension points the PFA Ascend "
                       "backend needs; --attention-backend pfa will not be honoured on NPU.")
        return False
    return patch_backend_selection(NPUPlatform, PFA_ASCEND_BACKEND)

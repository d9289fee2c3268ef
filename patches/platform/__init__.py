"""Platform patches: the attention backend selection of each platform."""

from vllm_pfa_patches.platform import cpu_attn_backend_selection


def apply_platform_patches() -> dict[str, bool]:
    """Applies every platform patch; returns which ones are in effect."""
    return {"cpu_attn_backend_selection": cpu_attn_backend_selection.apply()}

"""KV-cache allocation patches (applied in every process, before a worker allocates its KV cache)."""

from vllm_pfa_patches.kv_cache import ascend_contiguous_pa_layout


def apply_kv_cache_patches() -> dict[str, bool]:
    """Applies every KV-cache patch; returns which ones are in effect."""
    return {"ascend_contiguous_pa_layout": ascend_contiguous_pa_layout.apply()}

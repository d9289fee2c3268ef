"""Version-checked changes to vLLM / vllm-ascend behaviour that the PFA plugin needs.

Each patch module states what it changes, why, how, for which version, and when it can be removed; `apply()` is
idempotent and refuses (with a log line, leaving the platform untouched) a version it was not written for.
Platform patches apply before workers start; KV-cache patches before a worker allocates its KV cache. The general
plugin applies both in every vLLM process.
"""

from vllm_pfa_patches.kv_cache import apply_kv_cache_patches
from vllm_pfa_patches.platform import apply_platform_patches

__all__ = ["apply_kv_cache_patches", "apply_platform_patches"]

"""Reading a request's K/V back from vllm-ascend's paged KV cache (pure torch: runs, and is tested, anywhere).

vllm-ascend's cache for one layer is `(2, num_blocks, block_size, num_kv_heads, head_size)` (its backend's
`get_kv_cache_shape`), handed to the impl as that tensor or as its (key, value) pair; a block's tokens are plain
rows, so a request's tokens are its blocks in block-table order.
"""

import torch

from vllm_pfa.ops.cpu_kv_layout import copy_tokens


def gather(kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], block_ids: torch.Tensor, seq_len: int,
           keys_out: torch.Tensor, values_out: torch.Tensor) -> None:
    """Writes one request's first `seq_len` keys and values into `[>= seq_len, kv_heads, head]` outputs."""
    for cache, out in zip((kv_cache[0], kv_cache[1]), (keys_out, values_out)):
        copy_tokens(cache.index_select(0, block_ids), seq_len, out)

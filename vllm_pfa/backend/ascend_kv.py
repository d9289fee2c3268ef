"""Reading a request's K/V back from vllm-ascend's paged KV cache (pure torch: runs, and is tested, anywhere).

vllm-ascend's cache for one layer is `(2, num_blocks, block_size, num_kv_heads, head_size)` (its backend's
`get_kv_cache_shape`), handed to the impl as that tensor or as its (key, value) pair; a block's tokens are plain
rows, so a request's tokens are its blocks in block-table order.
"""

import torch


def gather(kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], block_ids: torch.Tensor,
           seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one request's first `seq_len` tokens, each `[seq_len, kv_heads, head]`."""
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    return key_cache[block_ids].flatten(0, 1)[:seq_len], value_cache[block_ids].flatten(0, 1)[:seq_len]

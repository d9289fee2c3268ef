"""Reading a request's K/V back from vllm-ascend's paged KV cache (pure torch: runs, and is tested, anywhere).

vllm-ascend's cache for one layer is `(2, num_blocks, block_size, num_kv_heads, head_size)`, or
`(2, num_blocks, num_kv_heads, block_size, head_size)` with `VLLM_KV_CACHE_LAYOUT` HND / LBHNC (its backend's
`get_kv_cache_shape`), handed to the impl as that tensor or as its (key, value) pair. Its block table, and so the
block size to read with, are in kernel blocks, which can be smaller than the KV cache spec's blocks (hybrid /
multi-group models): the block size is read off the cache itself.
"""

import torch

from vllm_pfa.ops.cpu_kv_layout import copy_tokens


def gather(kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], block_ids: torch.Tensor, seq_len: int,
           keys_out: torch.Tensor, values_out: torch.Tensor, *, heads_major: bool = False) -> None:
    """Writes one request's first `seq_len` keys and values into `[>= seq_len, kv_heads, head]` outputs.

    `block_ids`: the request's block-table entries from its first block on (extra entries are ignored);
    `heads_major`: the HND / LBHNC layout."""
    for cache, out in zip((kv_cache[0], kv_cache[1]), (keys_out, values_out)):
        block_size = cache.shape[2] if heads_major else cache.shape[1]
        needed = -(-seq_len // block_size)
        if block_ids.numel() < needed:
            raise ValueError(f"vllm-pfa: {seq_len} cached tokens need {needed} blocks of {block_size}, but the block "
                             f"table row has {block_ids.numel()}")
        blocks = cache.index_select(0, block_ids[:needed])
        copy_tokens(blocks.transpose(1, 2) if heads_major else blocks, seq_len, out)

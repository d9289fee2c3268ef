"""Reading K/V back from vLLM's CPU paged KV cache, for prefills that attend to cached context.

A layer's cache is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, viewed as key and value halves
`[num_blocks, num_kv_heads, block_size, head_size]`. The block interior is written by the ISA-specific
`cpu_attn_reshape_and_cache`: for the "vec"/"vec16" ISAs a key block is stored transposed (`[head_size,
block_size]`) and a value block plain. Rather than trusting that, `probe` writes a pattern through vLLM's own op
and recognizes the layout; an unrecognized one (e.g. AMX) yields no reader, and the backend then sends requests
with context to the existing path.
"""

from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves of a CPU_ATTN layer cache, as vLLM's CPU backend views them."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    return key_cache, value_cache


@dataclass(frozen=True)
class CpuKVCacheReader:
    key_transposed: bool
    value_transposed: bool

    @staticmethod
    def _tokens(blocks: torch.Tensor, transposed: bool) -> torch.Tensor:
        """[n, kv_heads, block_size, head] blocks (in memory order) -> [n * block_size, kv_heads, head] tokens."""
        n, heads, block_size, head_size = blocks.shape
        if transposed:
            blocks = blocks.reshape(n, heads, head_size, block_size).transpose(2, 3)
        return blocks.transpose(1, 2).reshape(n * block_size, heads, head_size)

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor,
               seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one request's first `seq_len` tokens, each `[seq_len, kv_heads, head]`."""
        key_cache, value_cache = split_kv_cache(kv_cache)
        keys = self._tokens(key_cache[block_ids], self.key_transposed)[:seq_len]
        values = self._tokens(value_cache[block_ids], self.value_transposed)[:seq_len]
        return keys, values


def probe(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> CpuKVCacheReader | None:
    """The reader for the layout `cpu_attn_reshape_and_cache` writes with this ISA, or None if unrecognized."""
    num_kv_heads = 2
    kv_cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = split_kv_cache(kv_cache)
    pattern = torch.arange(block_size * num_kv_heads * head_size, dtype=torch.float32) % 251
    keys = pattern.reshape(block_size, num_kv_heads, head_size).to(dtype)
    values = -keys
    try:
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, torch.arange(block_size), isa)
    except RuntimeError:
        return None
    block_ids = torch.zeros(1, dtype=torch.long)
    for key_transposed in (True, False):
        for value_transposed in (False, True):
            reader = CpuKVCacheReader(key_transposed, value_transposed)
            got_keys, got_values = reader.gather(kv_cache, block_ids, block_size)
            if torch.equal(got_keys, keys) and torch.equal(got_values, values):
                return reader
    return None

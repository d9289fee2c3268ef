"""Real vLLM batches on the CPU paged KV cache, for the backend tests and the backend profile."""

from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_pfa.ops import cpu_kv_layout


@dataclass
class PagedBatch:
    query: torch.Tensor  # [new tokens, heads, head_size]
    key: torch.Tensor  # [new tokens, kv_heads, head_size]
    value: torch.Tensor
    kv_cache: torch.Tensor  # CPU_ATTN layout: cached context, and the new tokens' K/V if `cache_new_tokens`
    metadata: CommonAttentionMetadata
    keys_per_request: list[torch.Tensor]  # [seq_len, kv_heads, head_size]: cached context then new tokens
    values_per_request: list[torch.Tensor]


def make_paged_batch(requests: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_size: int,
                     block_size: int, dtype: torch.dtype, isa: str, seed: int = 0, cache_new_tokens: bool = True,
                     causal: bool = True) -> PagedBatch:
    """Random q/k/v for requests given as (query_len, seq_len), decodes first as vLLM orders them; K/V written
    through vLLM's own `cpu_attn_reshape_and_cache` into scattered blocks: every token's, or with
    `cache_new_tokens=False` the cached context only (the new tokens are then the backend's
    `do_kv_cache_update` to write, at `metadata.slot_mapping`, as vLLM's attention layer and backend tests do)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-seq // block_size) for _, seq in requests]
    num_blocks = sum(blocks_per_req) + 3
    block_ids = torch.randperm(num_blocks, generator=gen)  # scattered blocks, as a real allocator leaves them
    block_table = torch.zeros(len(requests), max(blocks_per_req), dtype=torch.int32)
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cpu_kv_layout.split_kv_cache(kv_cache)
    queries, all_keys, all_values, new_slots = [], [], [], []
    used = 0
    for r, ((q_len, seq_len), n_blocks) in enumerate(zip(requests, blocks_per_req)):
        block_table[r, :n_blocks] = block_ids[used:used + n_blocks].to(torch.int32)
        used += n_blocks
        positions = torch.arange(seq_len)
        slots = block_table[r, positions // block_size].to(torch.int64) * block_size + positions % block_size
        keys = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        cached = seq_len if cache_new_tokens else seq_len - q_len
        ops.cpu_attn_reshape_and_cache(keys[:cached], values[:cached], key_cache, value_cache, slots[:cached], isa)
        queries.append(torch.randn(q_len, num_heads, head_size, generator=gen).to(dtype))
        all_keys.append(keys)
        all_values.append(values)
        new_slots.append(slots[seq_len - q_len:])
    query_lens = [q for q, _ in requests]
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    metadata = CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32), num_reqs=len(requests),
        num_actual_tokens=sum(query_lens), max_query_len=max(query_lens), max_seq_len=max(s for _, s in requests),
        block_table_tensor=block_table, slot_mapping=torch.cat(new_slots), causal=causal,
        positions=torch.cat([torch.arange(seq - q, seq) for q, seq in requests]),  # CPU_ATTN's encoder-only build
    )
    new_keys = torch.cat([keys[seq - q:] for keys, (q, seq) in zip(all_keys, requests)])
    new_values = torch.cat([values[seq - q:] for values, (q, seq) in zip(all_values, requests)])
    return PagedBatch(torch.cat(queries), new_keys, new_values, kv_cache, metadata, all_keys, all_values)

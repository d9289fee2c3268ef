"""The fast CPU path of PFA for float inputs.

Band-shaped problems (modes 0 without a mask, 2, 3, 4; no pse_shift) run the package's native AVX-512 kernel
(`native_kernel`), the fastest measured on every causal shape (benchmarks/bench_op.py). Where it is not available
(a CPU without AVX-512, or the extension not built), square causal and unmasked problems of 4096+ tokens go to
torch's SDPA (`sdpa_path`) and other causal and unmasked problems to vLLM's CPU attention kernel
(`vllm_cpu_kernel`). Everything else float runs `blockwise_prompt_flash_attention`: query rows in blocks, each
block reading only the key range its rows can keep, so no S1 x S2 matrix is built and fully masked work is skipped.
SDPA and vLLM's kernel multiply masked keys' values by 0 and handle non-finite scores their own way, so problems
reading a NaN or inf go to the blockwise path, which follows the reference's NaN/Inf policy (`reference`).
"""

import torch

from vllm_pfa.ops import native_kernel, sdpa_path, vllm_cpu_kernel
from vllm_pfa.ops.layout import from_bnsd, to_bnsd
from vllm_pfa.ops.masks import batch_mask, key_range, keep_block
from vllm_pfa.ops.reference import kept_values_sum
from vllm_pfa.ops.validation import FLOAT_DTYPES, PFAProblem

# fp32 score elements one block may hold (64 MiB): bounds memory for any sequence length.
SCORE_BUDGET = 16 * 1024 * 1024
MAX_BLOCK_ROWS = 512


def handles(query: torch.Tensor, quant_scale2: torch.Tensor | None) -> bool:
    """Float inputs with float output; int8 input or output is left to the reference."""
    return query.dtype in FLOAT_DTYPES and quant_scale2 is None


def fast_prompt_flash_attention(query, key, value, problem: PFAProblem, *, pse_shift=None,
                                atten_mask=None) -> torch.Tensor:
    features = dict(has_pse=pse_shift is not None, has_mask=atten_mask is not None)
    on_cpu = query.device.type == "cpu"
    bands = native_kernel.plan(problem, query.dtype, **features) if on_cpu else None
    if bands is not None:
        return native_kernel.run(query, key, value, problem, bands)
    if sdpa_path.handles(problem, query.dtype, **features):
        delegate = lambda: sdpa_path.run(query, key, value, problem)  # noqa: E731
    else:
        kernel_plan = vllm_cpu_kernel.plan(problem, query.dtype, **features) if on_cpu else None
        delegate = None if kernel_plan is None else lambda: vllm_cpu_kernel.run(query, key, value, problem, kernel_plan)
    if delegate is not None and _reads_only_finite(query, key, value, problem):
        return delegate()
    return blockwise_prompt_flash_attention(query, key, value, problem, pse_shift=pse_shift, atten_mask=atten_mask)


def _reads_only_finite(query, key, value, problem: PFAProblem) -> bool:
    """Whether every query row and key/value the problem reads (within the actual lengths) is finite."""
    p = problem
    q = to_bnsd(query, p.layout, p.num_heads)
    k = to_bnsd(key, p.layout, p.num_kv_heads)
    v = to_bnsd(value, p.layout, p.num_kv_heads)
    return all(bool(torch.isfinite(t).all()) for b, (aq, akv) in enumerate(zip(p.actual_q, p.actual_kv))
               for t in (q[b, :, :aq], k[b, :, :akv], v[b, :, :akv]))


def _block_rows(num_heads: int, key_len: int) -> int:
    return max(16, min(MAX_BLOCK_ROWS, SCORE_BUDGET // max(1, num_heads * key_len)))


def blockwise_prompt_flash_attention(query, key, value, problem: PFAProblem, *, pse_shift=None,
                                     atten_mask=None) -> torch.Tensor:
    p = problem
    q = to_bnsd(query, p.layout, p.num_heads)
    k = to_bnsd(key, p.layout, p.num_kv_heads)
    v = to_bnsd(value, p.layout, p.num_kv_heads)
    out = torch.zeros(p.batch, p.num_heads, p.q_seq, p.head_dim, dtype=p.out_dtype, device=query.device)
    has_mask = atten_mask is not None
    group = p.group_size
    for b in range(p.batch):
        aq, akv = p.actual_q[b], p.actual_kv[b]
        if aq == 0 or akv == 0:
            continue
        mask = batch_mask(atten_mask, b) if p.sparse_mode in (0, 1) else None
        kb, vb = k[b, :, :akv].float(), v[b, :, :akv].float()
        rows_per_block = _block_rows(p.num_heads, akv)
        for row_start in range(0, aq, rows_per_block):
            row_end = min(row_start + rows_per_block, aq)
            lo, hi = key_range(p.sparse_mode, has_mask, row_start, row_end, aq, akv, p.pre_tokens, p.next_tokens)
            if lo >= hi:
                continue  # every row of the block keeps nothing: output stays 0
            rows = torch.arange(row_start, row_end, device=query.device)
            cols = torch.arange(lo, hi, device=query.device)
            keep = keep_block(p.sparse_mode, rows, cols, aq, akv, p.pre_tokens, p.next_tokens,
                              None if mask is None else mask[row_start:row_end, lo:hi])
            # GQA without repeating K/V: the `group` query heads of one kv head share a batched matmul.
            qg = q[b, :, row_start:row_end].float().reshape(p.num_kv_heads, group * (row_end - row_start), -1)
            scores = (qg @ kb[:, lo:hi].transpose(-1, -2)).view(p.num_heads, row_end - row_start, hi - lo)
            scores.mul_(p.scale_value)
            if pse_shift is not None:
                scores += pse_shift[b if pse_shift.shape[0] > 1 else 0, :, row_start:row_end, lo:hi].float()
            if not bool(keep.all()):
                scores.masked_fill_(~keep, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            kept_rows = keep.any(dim=-1, keepdim=True)
            if not bool(kept_rows.all()):
                probs = torch.where(kept_rows, probs, 0.0)
            # rows of the grouped view are (query head in group, row): the block's keep repeats per group head
            pv = kept_values_sum(probs.view(p.num_kv_heads, -1, hi - lo), keep.repeat(group, 1), vb[:, lo:hi])
            out[b, :, row_start:row_end] = pv.view(p.num_heads, row_end - row_start, -1).to(p.out_dtype)
    return from_bnsd(out, p.layout)

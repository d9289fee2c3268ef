"""Square causal (and unmasked) PFA problems on long sequences, delegated to torch's SDPA.

Measured here (benchmarks/bench_op.py, 2 cores): on long sequences torch's CPU flash-attention kernel behind
`scaled_dot_product_attention` is faster than vLLM's CPU attention kernel (bf16/fp16, D=128: 1.06x at 4096, 1.09x
at 8192; D=64: even at 4096, 1.01-1.05x at 8192), and it needs no repaging. SDPA's `is_causal` aligns the diagonal
to the top-left, which equals PFA's bottom-right alignment (sparse_mode 2 and 3) only when a batch's query and key
lengths are equal, so only such problems come here. With `is_causal` and a scale <= 0 (allowed by PFA; no model uses
one) torch's CPU kernel returns NaN or wrong rows, and with an infinite scale it leaves values where the reference's
softmax gives NaN (measured with torch 2.13 in fp32, fp16 and bf16; found by tests/test_op_fuzz.py), so those stay on
the other paths.
"""

import math

import torch

from vllm_pfa.ops.layout import from_bnsd, to_bnsd
from vllm_pfa.ops.validation import PFAProblem

MIN_SEQ = 4096  # for head_dim >= 128; smaller heads from twice that


def handles(problem: PFAProblem, dtype: torch.dtype, *, has_pse: bool, has_mask: bool) -> bool:
    p = problem
    min_seq = MIN_SEQ if p.head_dim >= 128 else 2 * MIN_SEQ
    if (has_pse or dtype not in (torch.float16, torch.bfloat16, torch.float32) or max(p.actual_q) < min_seq
            or not math.isfinite(p.scale_value)):
        return False
    if p.sparse_mode == 0 and not has_mask:
        return True
    return (p.sparse_mode in (2, 3) and p.scale_value > 0
            and all(aq == akv for aq, akv in zip(p.actual_q, p.actual_kv)))


def run(query, key, value, problem: PFAProblem) -> torch.Tensor:
    p = problem
    q = to_bnsd(query, p.layout, p.num_heads)
    k = to_bnsd(key, p.layout, p.num_kv_heads)
    v = to_bnsd(value, p.layout, p.num_kv_heads)

    def attend(b: int, aq: int, akv: int) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :, :aq], k[b:b + 1, :, :akv], v[b:b + 1, :, :akv], is_causal=p.sparse_mode != 0,
            scale=p.scale_value, enable_gqa=p.num_kv_heads != p.num_heads)

    if p.batch == 1 and p.actual_q[0] == p.q_seq and p.actual_kv[0]:
        return from_bnsd(attend(0, p.q_seq, p.actual_kv[0]), p.layout)  # no padding: SDPA's output is the result
    out = torch.zeros(p.batch, p.num_heads, p.q_seq, p.head_dim, dtype=query.dtype, device=query.device)
    for b, (aq, akv) in enumerate(zip(p.actual_q, p.actual_kv)):
        if aq and akv:
            out[b, :, :aq] = attend(b, aq, akv)[0]
    return from_bnsd(out, p.layout)

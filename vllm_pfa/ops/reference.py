"""The exact reference of PFA: small, readable, fp32 math (float64 for exact int8 products). The test oracle.

It builds each batch's full S1 x S2 score matrix, so it is meant for correctness, not for long sequences.
"""

import torch

from vllm_pfa.ops.layout import from_bnsd, to_bnsd
from vllm_pfa.ops.masks import batch_mask, keep_block
from vllm_pfa.ops.quant import deq_scale_value, quantize_output, saturate_int8
from vllm_pfa.ops.validation import PFAProblem


def _float_attention(q, k, v, keep, scale, pse):
    """softmax(scale * q k^T + pse, masked) v for one batch; rows with no kept key give 0."""
    scores = scale * (q.float() @ k.float().transpose(-1, -2))
    if pse is not None:
        scores = scores + pse.float()
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.where(keep.any(dim=-1, keepdim=True), probs, 0.0)
    return probs @ v.float()


def _int8_attention(q, k, v, keep, scale, pse, deq1, qscale1, deq2):
    """The A2/A3 int8 pipeline: dequantized fp16 scores, int8-quantized probabilities, fp16 output."""
    raw = (q.double() @ k.double().transpose(-1, -2)).float()  # int32-exact
    scores = (raw * deq1).half().float() * scale
    if pse is not None:
        scores = scores + pse.float()
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    unnormalized = torch.exp(scores - row_max)  # masked entries are exp(-inf) = 0
    p8 = saturate_int8(unnormalized * qscale1)
    pv = (p8.double() @ v.double()).float()  # int32-exact
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    out = (pv * deq2).half().float() / torch.where(row_sum > 0, row_sum, 1.0)
    return torch.where(keep.any(dim=-1, keepdim=True), out, 0.0).half().float()


def reference_prompt_flash_attention(query, key, value, problem: PFAProblem, *, pse_shift=None, atten_mask=None,
                                     deq_scale1=None, quant_scale1=None, deq_scale2=None, quant_scale2=None,
                                     quant_offset2=None) -> torch.Tensor:
    p = problem
    q = to_bnsd(query, p.layout, p.num_heads)
    k = to_bnsd(key, p.layout, p.num_kv_heads)
    v = to_bnsd(value, p.layout, p.num_kv_heads)
    out = torch.zeros(p.batch, p.num_heads, p.q_seq, p.head_dim, dtype=torch.float32, device=query.device)
    rows = torch.arange(p.q_seq, device=query.device)
    for b in range(p.batch):
        akv = p.actual_kv[b]  # keys past the actual length are excluded: never read (padding may hold anything)
        cols = torch.arange(akv, device=query.device)
        mask = batch_mask(atten_mask, b)
        mask = None if mask is None or p.sparse_mode >= 2 else mask[: p.q_seq, :akv]
        keep = keep_block(p.sparse_mode, rows, cols, p.actual_q[b], akv, p.pre_tokens, p.next_tokens, mask)
        kb = k[b, :, :akv].repeat_interleave(p.group_size, dim=0)  # query head n reads kv head n // group
        vb = v[b, :, :akv].repeat_interleave(p.group_size, dim=0)
        pse = None if pse_shift is None else pse_shift[b if pse_shift.shape[0] > 1 else 0, :, : p.q_seq, :akv]
        if query.dtype == torch.int8:
            out[b] = _int8_attention(
                q[b], kb, vb, keep, p.scale_value, pse,
                deq_scale_value(deq_scale1), float(quant_scale1.reshape(-1)[0]), deq_scale_value(deq_scale2),
            )
        else:
            out[b] = _float_attention(q[b], kb, vb, keep, p.scale_value, pse)
    if quant_scale2 is not None:
        result = quantize_output(out, quant_scale2, quant_offset2, p.num_heads, p.head_dim)
    else:
        result = out.to(p.out_dtype)
    return from_bnsd(result, p.layout)

"""The exact reference of PFA: small, readable, fp32 math (float64 for exact int8 products). The test oracle.

It builds each batch's full S1 x S2 score matrix, so it is meant for correctness, not for long sequences.

Non-finite values (NaN, +-inf): the policy every implementation follows (reference, native kernel, the other fast
paths). Row i of batch b keeps the keys j < actual_seq_lengths_kv[b] that its mask and sparse_mode keep; K_i is
that set. Scores are s_ij = scale_value * (q_i . k_j) + pse_ij in fp32 IEEE arithmetic.
1. What a row does not keep is never read: a NaN or +-inf in a masked key's K or V, in pse at a masked position,
   or anywhere past the actual lengths has no effect. A masked key contributes nothing, not 0 x inf = NaN.
2. Rows i >= actual_seq_lengths[b] and rows with K_i empty are 0, whatever their query holds.
3. Otherwise, if some s_ij (j in K_i) is NaN or +inf, or every s_ij is -inf, the whole row is NaN.
4. Otherwise m = max s_ij is finite, w_j = exp(s_ij - m) and out_i = sum_j w_j v_j / sum_j w_j over j in K_i,
   each product w_j * v_jd in IEEE arithmetic: a NaN v_jd makes column d NaN; a +-inf v_jd makes it +-inf
   where w_j > 0 (NaN where both signs meet) and NaN where w_j == 0 (s_ij = -inf: 0 x inf).
int8 follows the same rules through its pipeline (the probabilities' and the output's int8 quantization map NaN
to 0 and saturate +-inf); an int8 output quantizes a NaN to 0.
"""

import torch

from vllm_pfa.ops.layout import from_bnsd, to_bnsd
from vllm_pfa.ops.masks import batch_mask, keep_block
from vllm_pfa.ops.quant import deq_scale_value, quantize_output, saturate_int8
from vllm_pfa.ops.validation import PFAProblem


def kept_values_sum(probs: torch.Tensor, keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`probs @ values` over the kept keys only (rule 1 and 4 of the policy above).

    `probs` [..., R, C] is 0 at masked keys, but a plain matmul still multiplies them: a non-finite value of a
    masked key would give 0 x inf = NaN. Finite values (the common case) take the matmul alone; otherwise the
    finite part is a matmul and each non-finite value a kept key holds is added as its IEEE product's class.
    `keep` [..., R, C] broadcasts against `probs`; `values` is [..., C, D].
    """
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return probs @ values
    out = probs @ torch.where(finite, values, 0.0)

    def hit(weights: torch.Tensor, where: torch.Tensor) -> torch.Tensor:  # [.., R, D]: some kept key meets one
        return (weights.to(values.dtype) @ where.to(values.dtype)) > 0

    weighted = keep & (probs > 0)  # NaN weights (a NaN row) compare False: `out` is NaN there already
    zero_weight = keep & (probs == 0)
    nan = hit(keep, values.isnan()) | hit(zero_weight, values.isinf())
    return (out + torch.where(hit(weighted, values == float("inf")), float("inf"), 0.0)
            + torch.where(hit(weighted, values == float("-inf")), float("-inf"), 0.0)
            + torch.where(nan, float("nan"), 0.0))


def _float_attention(q, k, v, keep, scale, pse):
    """softmax(scale * q k^T + pse, masked) v for one batch; rows with no kept key give 0."""
    scores = scale * (q.float() @ k.float().transpose(-1, -2))
    if pse is not None:
        scores = scores + pse.float()
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.where(keep.any(dim=-1, keepdim=True), probs, 0.0)
    return kept_values_sum(probs, keep, v.float())


def _int8_attention(q, k, v, keep, scale, pse, deq1, qscale1, deq2):
    """The A2/A3 int8 pipeline: dequantized fp16 scores, int8-quantized probabilities, fp16 output."""
    raw = (q.double() @ k.double().transpose(-1, -2)).float()  # int32-exact
    scores = (raw * deq1).half().float() * scale
    if pse is not None:
        scores = scores + pse.float()
    scores = scores.masked_fill(~keep, float("-inf"))
    # Rows with no kept key get NaN here and are zeroed below; a NaN, +inf or all -inf kept score makes the row
    # NaN through its sum (policy rule 3).
    unnormalized = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # masked entries are exp(-inf) = 0
    p8 = saturate_int8(unnormalized * qscale1)
    pv = (p8.double() @ v.double()).float()  # int32-exact
    out = (pv * deq2).half().float() / unnormalized.sum(dim=-1, keepdim=True)
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
        if not bool(keep.any()):
            continue  # no row keeps a key (e.g. actual_seq_lengths_kv = 0): the batch's output is 0
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

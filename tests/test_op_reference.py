"""The reference against an independent brute-force transcription of PFA's semantics (per-row loop, fp64)."""

import torch
from hypothesis import given, settings

from pfa_cases import problems
from vllm_pfa.ops import reference_npu_prompt_flash_attention


def _bnsd(t, layout, heads):
    if layout == "BSH":
        b, s, h = t.shape
        return t.reshape(b, s, heads, h // heads).permute(0, 2, 1, 3)
    return t.permute(0, 2, 1, 3) if layout == "BSND" else t


def _kept(mode, i, j, aq, akv, pre, nxt, mask_row):
    d = akv - aq
    if j >= akv:
        return False
    if mode == 0:
        return mask_row is None or (not mask_row[j] and i - pre <= j <= i + nxt)
    if mode == 1:
        return not mask_row[j]
    if mode == 2:
        return j <= i
    if mode == 3:
        return j <= i + d
    return i + d - pre <= j <= i + d + nxt


def brute_force(q, k, v, *, num_heads, input_layout, scale_value, sparse_mode, num_key_value_heads=0,
                actual_seq_lengths=None, actual_seq_lengths_kv=None, atten_mask=None, pse_shift=None,
                pre_tokens=2147483647, next_tokens=0):
    kv_heads = num_key_value_heads or num_heads
    qb, kb, vb = (_bnsd(t, input_layout, n).double() for t, n in ((q, num_heads), (k, kv_heads), (v, kv_heads)))
    batch, _, q_seq, dim = qb.shape
    kv_seq = kb.shape[2]

    def per_batch(lengths, default):
        if lengths is None:
            return [default] * batch
        return lengths * batch if len(lengths) == 1 else lengths[:batch]

    aqs, akvs = per_batch(actual_seq_lengths, q_seq), per_batch(actual_seq_lengths_kv, kv_seq)
    out = torch.zeros(batch, num_heads, q_seq, dim, dtype=torch.float64)
    for b in range(batch):
        mask = None
        if atten_mask is not None and sparse_mode in (0, 1):
            mask = atten_mask.reshape(-1, *atten_mask.shape[-2:])
            mask = mask[b if mask.shape[0] > 1 else 0].bool()
        for n in range(num_heads):
            kv_n = n // (num_heads // kv_heads)
            for i in range(aqs[b]):
                cols = [j for j in range(kv_seq) if _kept(sparse_mode, i, j, aqs[b], akvs[b], pre_tokens,
                                                          next_tokens, None if mask is None else mask[i])]
                if not cols:
                    continue
                scores = torch.stack([scale_value * (qb[b, n, i] @ kb[b, kv_n, j]) for j in cols])
                if pse_shift is not None:
                    scores += pse_shift[b if pse_shift.shape[0] > 1 else 0, n, i, cols].double()
                weights = torch.softmax(scores, dim=0)
                out[b, n, i] = weights @ vb[b, kv_n, cols]
    if input_layout == "BNSD":
        return out
    out = out.permute(0, 2, 1, 3)
    return out.flatten(2) if input_layout == "BSH" else out


@settings(max_examples=150, deadline=None)
@given(problems(max_seq=12))
def test_reference_matches_brute_force(case):
    q, k, v, kwargs = case
    expected = brute_force(q, k, v, **kwargs)
    actual = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)

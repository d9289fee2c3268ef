"""The Ascend adapter's platform-independent parts, in this process: reading K/V out of vllm-ascend's cache layouts
(vllm_pfa.backend.ascend_kv) and the shared planning (vllm_pfa.backend.prefill). The vllm-ascend subclasses
themselves (`vllm_pfa.backend.ascend_attn`) run against vllm-ascend's released source in the contract suite
(tests/ascend_contract, started by test_ascend_contract.py)."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm.platforms.cpu import CpuPlatform

from pfa_cases import count_ops
from vllm_pfa.backend import ascend_kv
from vllm_pfa.backend.prefill import consecutive_within_budget, plan_prefill, window_start
from vllm_pfa_patches.platform import ascend_attn_backend_selection

BLOCK, KV_HEADS, HEAD = 16, 2, 8


def _layouts(num_blocks: int, dtype=torch.float32):
    """One layer's (K, V) in each layout vllm-ascend uses, with the same content: token t of block b, head h,
    holds a value derived from (half, b, t, h)."""
    content = torch.arange(2 * num_blocks * BLOCK * KV_HEADS * HEAD, dtype=dtype).view(
        2, num_blocks, BLOCK, KV_HEADS, HEAD)
    hidden = BLOCK * KV_HEADS * HEAD
    interleaved = torch.as_strided(torch.empty(2 * num_blocks * hidden + 7, dtype=dtype)[7:],  # odd storage offset
                                   content.shape, (hidden, 2 * hidden, KV_HEADS * HEAD, HEAD, 1))
    interleaved.copy_(content)
    heads_major = content.transpose(2, 3).contiguous()  # (2, blocks, kv_heads, block, head)
    separate = (content[0].clone(), content[1].clone())  # two allocations
    return content, {
        "contiguous": ((content[0], content[1]), False),
        "interleaved": ((interleaved[0], interleaved[1]), False),
        "heads_major": ((heads_major[0], heads_major[1]), True),
        "separate": (separate, False),
    }


def _expected(content, block_table, requests, kv_starts, kv_lens):
    """[2, B, max_kv, kv_heads, head]: each request's keys/values from kv_start, padding repeating its last one."""
    max_kv = max(kv_lens)
    out = torch.empty(2, len(kv_lens), max_kv, KV_HEADS, HEAD, dtype=content.dtype)
    for b, (r, start, n) in enumerate(zip(requests, kv_starts, kv_lens)):
        positions = start + torch.clamp(torch.arange(max_kv), max=n - 1)
        out[:, b] = content[:, block_table[r, positions // BLOCK].long(), positions % BLOCK]
    return out


def _plan(seq_lens, query_lens, first=0, window=None):
    query_start = [0]
    for q in query_lens:
        query_start.append(query_start[-1] + q)
    return plan_prefill(first=first, num_reqs=len(seq_lens), token_start=query_start[first], query_start=query_start,
                        seq_lens_host=seq_lens, device=torch.device("cpu"), sliding_window=window)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved", "heads_major", "separate"])
def test_gather_reads_every_layout_with_one_index_select_per_storage(layout):
    content, layouts = _layouts(num_blocks=9)
    (key_cache, value_cache), heads_major = layouts[layout]
    block_table = torch.tensor([[4, 1, 7, 0], [2, 8, 0, 0], [5, 3, 6, 0]], dtype=torch.int32)
    seq_lens, query_lens = [40, 9, 33], [5, 9, 20]
    plan = _plan(seq_lens, query_lens)
    (indices,) = ascend_kv.build_call_indices(plan.calls, 0, torch.device("cpu"))
    geometry = ascend_kv.cache_geometry(key_cache, value_cache, heads_major=heads_major)
    assert geometry is not None and (geometry.value_base is None) == (layout == "separate")
    assert geometry.rows_per_token == (KV_HEADS if heads_major else 1)
    rows = ascend_kv.key_value_rows(indices, geometry, block_table)
    assert ascend_kv.key_value_rows(indices, geometry, block_table) is rows  # once per step
    out = torch.full((2, 3 * max(seq_lens) * geometry.rows_per_token, geometry.row_elems), float("nan"))
    ops = count_ops(lambda: ascend_kv.gather_keys_values(key_cache, value_cache, geometry, rows, out))
    assert ops.get("aten.index_select.out", 0) == (2 if layout == "separate" else 1)
    assert not {op for op in ops if "copy" in op or "clone" in op or "contiguous" in op}, ops
    expected = _expected(content, block_table, [0, 1, 2], [0, 0, 0], seq_lens)
    torch.testing.assert_close(out.view(2, 3, max(seq_lens), KV_HEADS, HEAD), expected, atol=0, rtol=0)


def test_unaddressable_cache_has_no_geometry_and_is_gathered_by_index():
    """A cache whose head dimension is not dense is not row-addressable: the fallback indexes the views."""
    content, _ = _layouts(num_blocks=4)
    strided = torch.empty(2, 4, BLOCK, KV_HEADS, 2 * HEAD)[..., ::2]
    strided.copy_(content)
    assert ascend_kv.cache_geometry(strided[0], strided[1], heads_major=False) is None
    block_table = torch.tensor([[3, 1]], dtype=torch.int32)
    plan = _plan([20], [20])
    (indices,) = ascend_kv.build_call_indices(plan.calls, 0, torch.device("cpu"))
    out = torch.empty(2, 20, KV_HEADS, HEAD)
    ascend_kv.gather_by_index(strided[0], strided[1], indices, block_table, heads_major=False, out=out)
    torch.testing.assert_close(out.unsqueeze(1), _expected(content, block_table, [0], [0], [20]), atol=0, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 60)), min_size=1, max_size=5),
       st.sampled_from(["contiguous", "interleaved", "heads_major", "separate"]), st.one_of(st.none(),
                                                                                        st.integers(1, 30)))
def test_gather_matches_direct_indexing(requests, layout, window):
    """Any batch, layout and window: the padded K/V equal each request's keys read one by one."""
    query_lens = [q for q, _ in requests]
    seq_lens = [q + c for q, c in requests]
    blocks_needed = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 1
    content, layouts = _layouts(num_blocks)
    (key_cache, value_cache), heads_major = layouts[layout]
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(sum(seq_lens)))
    block_table = torch.zeros(len(requests), max(blocks_needed), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_needed):
        block_table[r, :n] = order[used:used + n].to(torch.int32)
        used += n
    plan = _plan(seq_lens, query_lens, window=window)
    geometry = ascend_kv.cache_geometry(key_cache, value_cache, heads_major=heads_major)
    (call,) = plan.calls
    (indices,) = ascend_kv.build_call_indices(plan.calls, 0, torch.device("cpu"))
    rows = ascend_kv.key_value_rows(indices, geometry, block_table)
    out = torch.empty(2, indices.batch * indices.max_kv_len * geometry.rows_per_token, geometry.row_elems)
    ascend_kv.gather_keys_values(key_cache, value_cache, geometry, rows, out)
    expected = _expected(content, block_table, range(len(requests)), call.kv_starts, call.kv_lens)
    torch.testing.assert_close(out.view(expected.shape), expected, atol=0, rtol=0)
    assert call.kv_starts == [window_start(s, q, window) for s, q in zip(seq_lens, query_lens)]


def test_window_start_is_vllms_window():
    """vLLM keeps key j for row i when i - j < W: the first row of a request with c cached tokens is row c."""
    assert window_start(100, 10, 16) == 100 - 10 - 15
    assert window_start(20, 10, 16) == 0 and window_start(100, 10, None) == 0


def test_query_and_output_indices_pack_and_unpack_the_rows():
    plan = _plan([7, 3, 12], [7, 3, 5])
    (indices,) = ascend_kv.build_call_indices(plan.calls, 0, torch.device("cpu"))
    rows = torch.arange(15.0)
    packed = rows[indices.query_index].view(3, 7)
    assert packed[1].tolist() == [7, 8, 9, 9, 9, 9, 9] and packed[2, :5].tolist() == [10, 11, 12, 13, 14]
    assert torch.equal(packed.view(-1)[indices.output_index], rows)


def test_budgets_split_consecutive_requests():
    query = {0: 100, 1: 100, 2: 500, 3: 10, 4: 10}
    kv = {0: 100, 1: 300, 2: 500, 3: 4000, 4: 10}
    groups = consecutive_within_budget(query, kv, max_query_tokens=1024, max_kv_tokens=4096)
    assert groups == [[0, 1], [2], [3], [4]]  # 3 x 500 > 1024 tokens of queries; 2 x 4000 > 4096 of keys
    for group in groups:
        assert len(group) * max(query[r] for r in group) <= 1024 or len(group) == 1
        assert len(group) * max(kv[r] for r in group) <= 4096 or len(group) == 1


def test_ascend_patch_is_inert_without_vllm_ascend():
    if importlib.util.find_spec("vllm_ascend") is not None:
        pytest.skip("vllm_ascend is installed: the inert case does not apply")
    cpu_selection = CpuPlatform.get_attn_backend_cls
    assert ascend_attn_backend_selection.apply() is False
    assert CpuPlatform.get_attn_backend_cls == cpu_selection

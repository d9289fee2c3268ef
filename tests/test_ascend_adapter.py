"""The Ascend adapter's platform-independent parts, in this process: vllm-ascend's cache layout and the shared PFA
prefill. The vllm-ascend subclasses themselves (`vllm_pfa.backend.ascend_attn`) run against vllm-ascend's released
source in the contract suite (tests/ascend_contract, started by test_ascend_contract.py)."""

import importlib.util
import math

import pytest
import torch

from vllm.platforms.cpu import CpuPlatform

from test_backend import BATCHES, BLOCK_SIZE, HEAD_SIZE, HEADS, KV_HEADS, _make_batch, _run
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
from vllm_pfa.backend import ascend_kv
from vllm_pfa.backend.prefill import mask_arguments, plan_prefill, run_prefill
from vllm_pfa.ops import cpu_kv_layout
from vllm_pfa_patches.platform import ascend_attn_backend_selection


def _ascend_cache_from_cpu_cache(kv_cache: torch.Tensor, layout) -> torch.Tensor:
    """The same K/V, block for block, in vllm-ascend's (2, num_blocks, block_size, kv_heads, head) layout."""
    num_blocks = kv_cache.shape[0]
    all_blocks = torch.arange(num_blocks)
    tokens = torch.empty(2, num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_SIZE, dtype=kv_cache.dtype)
    layout.gather(kv_cache, all_blocks, num_blocks * BLOCK_SIZE, tokens[0], tokens[1])
    return tokens.unflatten(1, (num_blocks, BLOCK_SIZE))


def test_gather_reads_blocks_in_table_order():
    cache = torch.randn(2, 6, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    blocks = torch.tensor([4, 1, 5])
    seq_len = 2 * BLOCK_SIZE + 3
    keys, values = (torch.full((seq_len + 4, KV_HEADS, HEAD_SIZE), float("nan")) for _ in range(2))
    ascend_kv.gather(cache, blocks, seq_len, keys, values)
    assert torch.equal(keys[BLOCK_SIZE + 2], cache[0, 1, 2]) and torch.equal(values[2 * BLOCK_SIZE], cache[1, 5, 0])
    assert torch.equal(keys[:seq_len], cache[0, blocks].flatten(0, 1)[:seq_len]) and keys[seq_len:].isnan().all()
    keys_pair, values_pair = torch.empty(10, KV_HEADS, HEAD_SIZE), torch.empty(10, KV_HEADS, HEAD_SIZE)
    ascend_kv.gather((cache[0], cache[1]), blocks, 10, keys_pair, values_pair)
    assert torch.equal(keys_pair, keys[:10]) and torch.equal(values_pair, values[:10])


def test_gather_reads_the_block_size_off_the_cache_and_ignores_extra_entries():
    """The block table is in kernel blocks; a whole row (trailing entries included) is what the adapter passes."""
    cache = torch.randn(2, 9, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    row = torch.tensor([7, 2, 0, 0, 0])
    keys, values = torch.empty(BLOCK_SIZE + 5, KV_HEADS, HEAD_SIZE), torch.empty(BLOCK_SIZE + 5, KV_HEADS, HEAD_SIZE)
    ascend_kv.gather(cache, row, BLOCK_SIZE + 5, keys, values)
    assert torch.equal(keys, cache[0, [7, 2]].flatten(0, 1)[: BLOCK_SIZE + 5])
    with pytest.raises(ValueError, match="need 3 blocks of 32, but the block table row has 2"):
        ascend_kv.gather(cache, row[:2], 2 * BLOCK_SIZE + 1, torch.empty(80, KV_HEADS, HEAD_SIZE),
                         torch.empty(80, KV_HEADS, HEAD_SIZE))


def test_gather_heads_major_layout():
    """VLLM_KV_CACHE_LAYOUT=HND / LBHNC: (2, num_blocks, kv_heads, block_size, head)."""
    cache = torch.randn(2, 6, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    blocks, seq_len = torch.tensor([3, 0]), BLOCK_SIZE + 7
    expected = [torch.empty(seq_len, KV_HEADS, HEAD_SIZE) for _ in range(2)]
    ascend_kv.gather(cache, blocks, seq_len, *expected)
    got = [torch.empty(seq_len, KV_HEADS, HEAD_SIZE) for _ in range(2)]
    ascend_kv.gather(cache.transpose(2, 3).contiguous(), blocks, seq_len, *got, heads_major=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("batch", ["mixed", "prefills_with_context", "fresh_prefills"])
def test_prefill_over_ascend_cache_layout_matches_cpu_attn(batch):
    requests = BATCHES[batch]
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, torch.float32, requests)
    layout = cpu_kv_layout.probe("vec", torch.float32, BLOCK_SIZE, HEAD_SIZE)
    query, key, value, kv_cache, common = _make_batch(requests, torch.float32, "vec")
    ascend_cache = _ascend_cache_from_cpu_cache(kv_cache, layout)
    first = sum(1 for q, _ in requests if q == 1)
    query_start = common.query_start_loc_cpu.tolist()
    plan = plan_prefill(first=first, num_reqs=len(requests), token_start=query_start[first],
                        query_start=query_start, seq_lens_host=common.seq_lens.tolist(),
                        block_table=common.block_table_tensor, block_size=BLOCK_SIZE, device=torch.device("cpu"),
                        gather=ascend_kv.gather)
    output = torch.full_like(query, float("nan"))
    run_prefill(query, key, value, ascend_cache, plan, output, num_heads=HEADS, num_kv_heads=KV_HEADS,
                head_size=HEAD_SIZE, scale=1 / math.sqrt(HEAD_SIZE), mask_args=mask_arguments(None))
    rows = slice(query_start[first], None)
    torch.testing.assert_close(output[rows], expected[rows], atol=1e-5, rtol=1e-5)


def test_ascend_patch_is_inert_without_vllm_ascend():
    if importlib.util.find_spec("vllm_ascend") is not None:
        pytest.skip("vllm_ascend is installed: the inert case does not apply")
    cpu_selection = CpuPlatform.get_attn_backend_cls
    assert ascend_attn_backend_selection.apply() is False
    assert CpuPlatform.get_attn_backend_cls == cpu_selection

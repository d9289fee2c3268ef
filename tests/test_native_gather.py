"""The native one-pass gather of context K/V from vLLM's CPU paged cache, against the torch implementation."""

import pytest
import torch

from vllm_pfa.backend.staging import StagingBuffers
from vllm_pfa.ops import cpu_kv_layout
from vllm_pfa.ops.cpu_kv_layout import CpuKVLayout, split_kv_cache
from vllm_pfa.ops.native_kernel import extension

native = pytest.mark.skipif(extension() is None, reason="the native extension needs an AVX-512 CPU and a built _C")


def _gather_both_ways(layout, kv_cache, block_ids, seq_len, heads, dim, dtype, monkeypatch):
    outputs = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(cpu_kv_layout, "extension", lambda: None)
        keys = torch.full((seq_len + 5, heads, dim), -7.0).to(dtype)
        values = torch.full_like(keys, -7.0)
        layout.gather(kv_cache, block_ids, seq_len, keys, values)
        outputs.append((keys, values))
    return outputs


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("key_transposed,value_transposed", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("block_size,dim,seq_len", [(128, 128, 1536), (32, 64, 70), (16, 48, 33), (32, 32, 1),
                                                     (32, 64, 51), (16, 64, 37), (16, 40, 21)])
def test_native_gather_matches_torch(dtype, key_transposed, value_transposed, block_size, dim, seq_len,
                                     monkeypatch):
    """Whole and partial blocks, out-of-order block ids, head dims on and off the 32-wide vector path; transposed
    16-bit blocks through their 16-token transposes, then pairs of tokens, then one token (51 = 32 + 16 + 2 + 1);
    transposed 32-bit blocks through 16 x 16 transposes, a partial one last (37, 21), or element-wise (40 dims)."""
    heads = 4
    num_blocks = -(-seq_len // block_size)
    kv_cache = torch.randn(num_blocks + 3, heads, block_size, 2 * dim).to(dtype)
    block_ids = torch.randperm(num_blocks + 3)[:num_blocks]
    layout = CpuKVLayout(key_transposed, value_transposed)
    (k_native, v_native), (k_torch, v_torch) = _gather_both_ways(layout, kv_cache, block_ids, seq_len, heads, dim,
                                                                 dtype, monkeypatch)
    assert torch.equal(k_native, k_torch) and torch.equal(v_native, v_torch)
    assert bool((k_native[seq_len:] == -7).all())  # nothing written past seq_len


@native
def test_native_gather_rejects_bad_arguments():
    kv_cache = torch.zeros(4, 2, 16, 2 * 32, dtype=torch.bfloat16)
    key_cache, value_cache = split_kv_cache(kv_cache)
    out = torch.empty(40, 2, 32, dtype=torch.bfloat16)
    gather = extension().gather_paged_kv
    with pytest.raises(RuntimeError, match="block id 9 out of range"):
        gather(key_cache, value_cache, torch.tensor([0, 9]), 20, out, out.clone(), True, False)
    with pytest.raises(RuntimeError, match="needs more blocks"):
        gather(key_cache, value_cache, torch.tensor([0]), 20, out, out.clone(), True, False)
    with pytest.raises(RuntimeError, match="does not hold 20 tokens"):
        gather(key_cache, value_cache, torch.tensor([0, 1]), 20, out[:10], out.clone(), True, False)
    with pytest.raises(RuntimeError, match="int64"):
        gather(key_cache, value_cache, torch.tensor([0, 1], dtype=torch.int32), 20, out, out.clone(), True, False)


def test_staging_buffers_are_reused_and_grow():
    staging = StagingBuffers()
    like = torch.zeros(1, dtype=torch.bfloat16)
    first = staging.view("keys", like, 2, 10, 4)
    again = staging.view("keys", like, 1, 5, 4)
    assert again.shape == (1, 5, 4) and again.data_ptr() == first.data_ptr()
    bigger = staging.view("keys", like, 4, 10, 4)
    assert bigger.shape == (4, 10, 4) and bigger.dtype == torch.bfloat16
    assert staging.view("keys", like.float(), 1, 5, 4).dtype == torch.float32
    assert staging.reserved_bytes() == 160 * 2 + 20 * 4  # the grown bf16 buffer and the float32 one


@pytest.mark.parametrize("block_size,dim", [(32, 64), (128, 128), (64, 64)])
def test_amx_layout_is_read_and_written_like_vllms_writer(block_size, dim):
    """vLLM's AMX ISA packs a head's block in VNNI pairs (keys by dimension pairs, values by token pairs): recognized
    as a permutation through vLLM's own writer, so bf16 context prefills on AMX CPUs go through PFA too."""
    from vllm import _custom_ops as ops

    layout = cpu_kv_layout.probe("amx", torch.bfloat16, block_size, dim)
    assert isinstance(layout, cpu_kv_layout.PermutedKVLayout)
    heads, seq_len = 3, 2 * block_size + 7
    num_blocks = -(-seq_len // block_size)
    keys, values = torch.randn(2, seq_len, heads, dim).to(torch.bfloat16)
    block_ids = torch.randperm(num_blocks + 2)[:num_blocks]
    slots = block_ids.repeat_interleave(block_size)[:seq_len] * block_size + torch.arange(seq_len) % block_size
    by_vllm = torch.zeros(num_blocks + 2, heads, block_size, 2 * dim, dtype=torch.bfloat16)
    ops.cpu_attn_reshape_and_cache(keys, values, *split_kv_cache(by_vllm), slots, "amx")
    got_keys, got_values = torch.zeros(seq_len, heads, dim, dtype=torch.bfloat16), torch.zeros(seq_len, heads, dim,
                                                                                                 dtype=torch.bfloat16)
    layout.gather(by_vllm, block_ids, seq_len, got_keys, got_values)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    ours = torch.zeros_like(by_vllm)
    layout.write(*split_kv_cache(ours), 0, keys, values)
    ordered = torch.zeros_like(by_vllm)
    ops.cpu_attn_reshape_and_cache(keys, values, *split_kv_cache(ordered), torch.arange(seq_len), "amx")
    assert torch.equal(ours, ordered)

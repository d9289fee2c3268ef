"""Backend level: the PFA backend against vLLM's CPU_ATTN backend on the same paged KV cache.

Batches are built as vLLM's scheduler hands them over (decodes first): decode-only, fresh prefills, prefills with
cached context (chunked prefill / prefix-cache hit), and mixes; real `CommonAttentionMetadata`, real builders.
"""

import functools
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
from vllm.v1.kv_cache_interface import FullAttentionSpec

from pfa_cases import count_ops
from vllm_pfa.backend.pfa_attn import PFAAttentionImpl, PFAMetadataBuilder
from vllm_pfa.backend.stats import STATS
from vllm_pfa.model_builder import build_model
from vllm_pfa.ops import compressed_causal_mask, cpu_kv_layout, native_kernel
from vllm_pfa.testing import make_paged_batch

# the model config (tiny: 4 heads over 2 kv heads, head 64) sizes the CPU kernel scratchpad: match it
HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 4, 2, 64, 32

# (query_len, seq_len) per request, decodes first
BATCHES = {
    "decode_only": [(1, 17), (1, 64), (1, 5)],
    "fresh_prefills": [(13, 13), (70, 70), (2, 2)],
    "one_fresh_prefill": [(150, 150)],
    "prefills_with_context": [(10, 50), (33, 97), (64, 64 + 32)],
    "mixed": [(1, 20), (1, 70), (25, 25), (16, 80), (3, 34)],
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@functools.cache
def _config(dtype: torch.dtype) -> VllmConfig:
    # The model dtype is what the CPU builders plan the kernel for: it must be the cache's dtype.
    return VllmConfig(model_config=ModelConfig(model=str(build_model("tiny")), dtype=dtype),
                      cache_config=CacheConfig(block_size=BLOCK_SIZE))


def _spec(dtype):
    return FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=dtype)


def _make_batch(requests, dtype, isa):
    batch = make_paged_batch(requests, num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                             block_size=BLOCK_SIZE, dtype=dtype, isa=isa)
    return batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata


def _run(builder_cls, impl_cls, dtype, requests, sliding_window=None, configure=None, qkv_form="separate", ops=None):
    """The layer's output for the batch; `qkv_form` "fused": q, k, v as vLLM's layers pass them, views of one fused
    projection, "d_strided": their head axis at a stride other than 1; `ops` (a dict) receives the aten ops the
    impl's forward ran, with their counts."""
    with set_current_vllm_config(_config(dtype)):
        return _run_in_config(builder_cls, impl_cls, dtype, requests, sliding_window, configure, qkv_form, ops)


def _run_in_config(builder_cls, impl_cls, dtype, requests, sliding_window, configure, qkv_form, ops):
    builder = builder_cls(_spec(dtype), [], _config(dtype), torch.device("cpu"))
    if sliding_window is not None:
        builder.window_size = sliding_window
    if configure:
        configure(builder)
    impl = impl_cls(HEADS, HEAD_SIZE, 1 / math.sqrt(HEAD_SIZE), KV_HEADS, None, sliding_window, "auto")
    layer = SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    query, key, value, kv_cache, common = _make_batch(requests, dtype, builder.isa)
    if qkv_form == "fused":
        fused = torch.cat([query, key, value], dim=1).flatten(1)
        query, key, value = (t.view(fused.shape[0], -1, HEAD_SIZE) for t in
                             fused.split([HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE], dim=1))
    elif qkv_form == "d_strided":
        query, key, value = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (query, key, value))
    output = torch.full((query.shape[0], HEADS, HEAD_SIZE), float("nan"), dtype=dtype)
    metadata = builder.build(0, common)
    forward = functools.partial(impl.forward, layer, query, key, value, kv_cache, metadata, output)
    if ops is None:
        forward()
    else:
        ops.update(count_ops(forward))
    return output


@pytest.mark.parametrize("qkv_form", ["separate", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_pfa_backend_matches_cpu_attn(dtype, batch, qkv_form):
    """Every batch shape with q, k, v as separate tensors and as vLLM's layers pass them (views of one projection)."""
    STATS.reset()
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, dtype, BATCHES[batch])
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, dtype, BATCHES[batch], qkv_form=qkv_form)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    prefill_tokens = sum(q for q, _ in BATCHES[batch] if q > 1)
    assert STATS.prefill_tokens == prefill_tokens and STATS.prefill_calls == (1 if prefill_tokens else 0)
    assert STATS.decode_tokens == sum(q for q, _ in BATCHES[batch] if q == 1)
    assert STATS.context_tokens == sum(s - q for q, s in BATCHES[batch] if q > 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["mixed", "prefills_with_context", "fresh_prefills"])
def test_large_requests_get_calls_of_their_own(dtype, batch):
    """Requests of >= own_call_min_tokens new tokens run as B = 1 calls (no packing copy); the rest share one."""
    STATS.reset()
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, dtype, BATCHES[batch])
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, dtype, BATCHES[batch],
                  configure=lambda builder: setattr(builder, "own_call_min_tokens", 16))
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    prefills = [q for q, _ in BATCHES[batch] if q > 1]
    alone = sum(q >= 16 for q in prefills)
    assert STATS.prefill_calls == alone + (1 if alone < len(prefills) else 0) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_request_reads_the_fused_projection_in_place(dtype):
    """vLLM's layers pass q, k, v as views of one fused projection: a fresh request's call (B = 1) hands them to
    the native kernel as they are, with no copy."""
    STATS.reset()
    requests = BATCHES["one_fresh_prefill"]
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, dtype, requests)
    ops: dict[str, int] = {}
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, dtype, requests, qkv_form="fused", ops=ops)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert STATS.prefill_calls == 1 and STATS.prefill_tokens == requests[0][0]
    assert not {op for op in ops if "copy" in op or "clone" in op or "contiguous" in op}, ops


@pytest.mark.parametrize("batch", ["one_fresh_prefill", "fresh_prefills"])
def test_q_k_v_with_a_strided_head_axis_are_copied_not_refused(batch):
    """The kernel reads rows of D at stride 1: q, k, v whose D axis is strided reach it as copies."""
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, torch.float32, BATCHES[batch])
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, torch.float32, BATCHES[batch], qkv_form="d_strided")
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


def test_a_step_validates_each_call_once_for_its_layers():
    """The step's first layer of each geometry validates and prepares its PFA calls; the step's other layers of
    that geometry run them on their own tensors (here: two full-attention layers, then a sliding-window one)."""
    requests, dtype = BATCHES["mixed"], torch.float32
    expected = {window: _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, dtype, requests,
                             sliding_window=window) for window in (None, 24)}
    with set_current_vllm_config(_config(dtype)):
        builder = PFAMetadataBuilder(_spec(dtype), [], _config(dtype), torch.device("cpu"))
        layer = SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0)
        query, key, value, kv_cache, common = _make_batch(requests, dtype, builder.isa)
        metadata = builder.build(0, common)
        with mock.patch.object(native_kernel, "validate", wraps=native_kernel.validate) as validate:
            for window in (None, None, 24):
                impl = PFAAttentionImpl(HEADS, HEAD_SIZE, 1 / math.sqrt(HEAD_SIZE), KV_HEADS, None, window, "auto")
                output = torch.full((query.shape[0], HEADS, HEAD_SIZE), float("nan"), dtype=dtype)
                impl.forward(layer, query, key, value, kv_cache, metadata, output)
                torch.testing.assert_close(output, expected[window], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert len(metadata.prefill.calls) == 1 and validate.call_count == 2


def test_own_call_threshold_is_about_one_mib_of_query_rows():
    with set_current_vllm_config(_config(torch.float32)):
        builder = PFAMetadataBuilder(_spec(torch.float32), [], _config(torch.float32), torch.device("cpu"))
    assert builder.own_call_min_tokens == (1 << 20) // (HEADS * HEAD_SIZE * 4)


@pytest.mark.parametrize("batch", ["mixed", "prefills_with_context"])
def test_sliding_window_goes_through_band_mode(batch):
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, torch.float32,
                    BATCHES[batch], sliding_window=24)
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, torch.float32, BATCHES[batch],
                  sliding_window=24)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


def test_unreadable_cache_layout_sends_context_prefills_to_existing_path():
    STATS.reset()
    requests = BATCHES["mixed"]
    expected = _run(CPUAttentionMetadataBuilder, CPUAttentionBackendImpl, torch.float32, requests)
    actual = _run(PFAMetadataBuilder, PFAAttentionImpl, torch.float32, requests,
                  configure=lambda builder: setattr(builder, "cache_layout", None))
    torch.testing.assert_close(actual, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    assert STATS.prefill_calls == 0 and STATS.existing_path_prefill_tokens == 25 + 16 + 3


def test_mask_is_built_once_and_shared():
    with set_current_vllm_config(_config(torch.float32)):
        builder = PFAMetadataBuilder(_spec(torch.float32), [], _config(torch.float32), torch.device("cpu"))
    _, _, _, _, common = _make_batch(BATCHES["mixed"], torch.float32, builder.isa)
    first, second = builder.build(0, common).prefill, builder.build(0, common).prefill
    assert first.atten_mask is second.atten_mask is compressed_causal_mask("cpu")
    assert first.atten_mask.dtype == torch.int8
    assert torch.equal(first.atten_mask, torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size,head_size", [(32, 64), (128, 128), (16, 64), (32, 80), (64, 256)])
def test_cache_layout_round_trips_through_vllm_reshape_and_cache(dtype, block_size, head_size):
    """Reading back what vLLM's writer stored, and writing what vLLM's writer would store, for each CPU ISA here."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size)
    layout = cpu_kv_layout.probe(isa, dtype, block_size, head_size)
    assert layout is not None, f"layout of ISA {isa} not recognized"
    seq_len, num_blocks = 3 * block_size - 5, 7
    kv_cache = torch.zeros(num_blocks, KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cpu_kv_layout.split_kv_cache(kv_cache)
    blocks = torch.tensor([5, 0, 3])
    slots = torch.tensor([int(blocks[j // block_size]) * block_size + j % block_size for j in range(seq_len)])
    keys = torch.randn(seq_len, KV_HEADS, head_size).to(dtype)
    values = torch.randn(seq_len, KV_HEADS, head_size).to(dtype)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    got_keys, got_values = torch.full_like(keys, float("nan")), torch.full_like(values, float("nan"))
    layout.gather(kv_cache, blocks, seq_len, got_keys, got_values)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)

    by_vllm = torch.zeros(num_blocks, KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    ops.cpu_attn_reshape_and_cache(keys, values, *cpu_kv_layout.split_kv_cache(by_vllm),
                                   torch.arange(seq_len) + 2 * block_size, isa)
    by_layout = torch.zeros_like(by_vllm)
    layout.write(*cpu_kv_layout.split_kv_cache(by_layout), 2, keys, values)
    assert torch.equal(by_layout, by_vllm)


def test_unsupported_features_are_refused():
    # refused before anything else is set up
    with pytest.raises(NotImplementedError, match="ALiBi"):
        PFAAttentionImpl(HEADS, HEAD_SIZE, 0.1, KV_HEADS, [0.1] * HEADS, None, "auto")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        PFAAttentionImpl(HEADS, HEAD_SIZE, 0.1, KV_HEADS, None, None, "auto", logits_soft_cap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        PFAAttentionImpl(HEADS, HEAD_SIZE, 0.1, KV_HEADS, None, None, "auto", sinks=torch.zeros(HEADS))

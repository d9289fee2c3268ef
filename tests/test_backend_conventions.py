"""The PFA backend driven the way vLLM's own backend tests drive a backend (`tests/v1/attention/` in vLLM's source:
batch specs of (seq_lens, query_lens), a paged cache holding the cached context, the new tokens' K/V written by
`impl.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)`, then `impl.forward`), compared
with an SDPA reference and with CPU_ATTN: decoder layers causal and bidirectional, with and without a sliding
window, encoder-only layers, GQA (4 query heads over 2 kv heads), several block sizes.
"""

import dataclasses
import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vllm.config import CacheConfig, CompilationConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata
from vllm.v1.kv_cache_interface import EncoderOnlyAttentionSpec, FullAttentionSpec

from vllm_pfa.backend.pfa_attn import PFAAttentionBackend
from vllm_pfa.backend.stats import STATS
from vllm_pfa.model_builder import build_model
from vllm_pfa.testing import make_paged_batch

HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 64  # the tiny model's: CPU_ATTN sizes its scratchpad from the model config
SCALE = 1 / math.sqrt(HEAD_SIZE)
WINDOW = 24

# name: (seq_lens, query_lens), decodes first as vLLM orders them; shapes from vLLM's BATCH_SPECS, shortened
BATCH_SPECS = {
    "small_decode": ([32, 40], [1, 1]),
    "small_prefill": ([32, 40], [8, 8]),
    "mixed_small": ([32, 40, 48, 56], [1, 1, 5, 5]),
    "medium_prefill": ([256, 512, 300], [16, 16, 16]),
    "mixed_medium": ([512, 300, 200, 512, 300], [1, 1, 1, 7, 40]),
    "single_prefill": ([600], [64]),
    "fresh_prefills": ([17, 70, 130], [17, 70, 130]),
}
ENCODER_SPECS = {
    "small_encoder_prefill": ([32, 64, 128, 7], [32, 64, 128, 7]),
    "single_token_inputs": ([1, 1, 9], [1, 1, 9]),  # one-token inputs are not decodes here
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@functools.cache
def _config(dtype: torch.dtype, block_size: int, speculative_tokens: int = 0) -> VllmConfig:
    if speculative_tokens:  # through vLLM's engine arguments, as `--speculative-config` builds it
        return EngineArgs(model=str(build_model("tiny")), dtype=dtype, block_size=block_size,
                          speculative_config=dict(method="ngram", num_speculative_tokens=speculative_tokens,
                                                  prompt_lookup_max=4, prompt_lookup_min=2)).create_engine_config()
    return VllmConfig(model_config=ModelConfig(model=str(build_model("tiny")), dtype=dtype),
                      cache_config=CacheConfig(block_size=block_size))


def _run(backend, spec, *, block_size, dtype, causal=True, window=None, attn_type=AttentionType.DECODER,
         speculative_tokens=0, shared_kv=False):
    seq_lens, query_lens = spec
    config = _config(dtype, block_size, speculative_tokens)
    spec_cls = EncoderOnlyAttentionSpec if attn_type == AttentionType.ENCODER_ONLY else FullAttentionSpec
    kv_cache_spec = spec_cls(block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=dtype)
    with set_current_vllm_config(config):
        builder = backend.get_builder_cls()(kv_cache_spec, [], config, torch.device("cpu"))
        impl = backend.get_impl_cls()(HEADS, HEAD_SIZE, SCALE, KV_HEADS, None, window, "auto", attn_type=attn_type)
    if window is not None:
        builder.window_size = window  # CPU_ATTN reads the group's window from registered layers; there are none
    batch = make_paged_batch(list(zip(query_lens, seq_lens)), num_heads=HEADS, num_kv_heads=KV_HEADS,
                             head_size=HEAD_SIZE, block_size=block_size, dtype=dtype, isa=builder.isa,
                             cache_new_tokens=False, causal=causal)
    metadata = builder.build(common_prefix_len=0, common_attn_metadata=batch.metadata)
    layer = SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    assert not backend.forward_includes_kv_cache_update
    impl.do_kv_cache_update(layer, batch.key, batch.value, batch.kv_cache, metadata.slot_mapping)
    output = torch.full_like(batch.query, float("nan"))
    # shared_kv: a layer that reuses another layer's K/V (Gemma-3n, Gemma-4) gets none of its own; the update above
    # stands for the target layer's write of the new tokens
    key, value = (None, None) if shared_kv else (batch.key, batch.value)
    impl.forward(layer, batch.query, key, value, batch.kv_cache, metadata, output=output)
    return output, batch, metadata


def _sdpa_reference(batch, spec, *, causal, window):
    """Per request, in fp32: query row i sits at position context + i; causal keeps keys j <= that position, a
    window of W keys keeps |position - j| < W (causal: the W - 1 keys before it and itself)."""
    outputs, start = [], 0
    for keys, values, seq_len, query_len in zip(batch.keys_per_request, batch.values_per_request, *spec):
        query = batch.query[start:start + query_len].float().transpose(0, 1)
        start += query_len
        keys, values = (t.float().repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1) for t in (keys, values))
        position = torch.arange(query_len)[:, None] + seq_len - query_len
        key_index = torch.arange(seq_len)[None, :]
        keep = torch.ones(query_len, seq_len, dtype=torch.bool)
        if causal:
            keep &= key_index <= position
        if window is not None:
            keep &= (position - key_index).abs() < window
        outputs.append(F.scaled_dot_product_attention(query, keys, values, attn_mask=keep, scale=SCALE).transpose(0, 1))
    return torch.cat(outputs)


def _check(spec, *, dtype, block_size=32, causal=True, window=None, attn_type=AttentionType.DECODER,
           speculative_tokens=0):
    STATS.reset()
    actual, batch, metadata = _run(PFAAttentionBackend, spec, block_size=block_size, dtype=dtype, causal=causal,
                                   window=window, attn_type=attn_type, speculative_tokens=speculative_tokens)
    stats = STATS.snapshot()
    tolerance = TOLERANCE[dtype]
    reference = _sdpa_reference(batch, spec, causal=causal, window=window)
    torch.testing.assert_close(actual.float(), reference, atol=tolerance, rtol=tolerance)
    expected, _, _ = _run(CPUAttentionBackend, spec, block_size=block_size, dtype=dtype, causal=causal,
                          window=window, attn_type=attn_type)
    torch.testing.assert_close(expected.float(), reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    return metadata, stats


def _assert_split(stats, query_lens):
    """Prefill rows went through PFA, decode rows through the existing path."""
    assert stats["prefill_tokens"] == sum(q for q in query_lens if q > 1)
    assert stats["decode_tokens"] == sum(q for q in query_lens if q == 1)


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(BATCH_SPECS))
def test_causal_batch_specs(name, dtype, block_size):
    _, stats = _check(BATCH_SPECS[name], dtype=dtype, block_size=block_size)
    _assert_split(stats, BATCH_SPECS[name][1])


@pytest.mark.parametrize("name", ["mixed_small", "mixed_medium", "fresh_prefills"])
def test_causal_sliding_window(name):
    _check(BATCH_SPECS[name], dtype=torch.float32, window=WINDOW)


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("name", sorted(BATCH_SPECS))
def test_bidirectional_decoder_layers(name, block_size, window):
    """causal=False: each row attends to every key of its request, or to those within the window on either side
    of its own position (|i - j| < W); PFA mode 0 without a mask, or band mode 4."""
    _, stats = _check(BATCH_SPECS[name], dtype=torch.float32, block_size=block_size, causal=False, window=window)
    _assert_split(stats, BATCH_SPECS[name][1])


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ENCODER_SPECS))
def test_encoder_only_layers(name, dtype, window):
    spec = ENCODER_SPECS[name]
    metadata, stats = _check(spec, dtype=dtype, causal=False, window=window, attn_type=AttentionType.ENCODER_ONLY)
    assert metadata.existing_path is None and stats["prefill_tokens"] == sum(spec[1])
    assert stats["context_tokens"] == 0 and stats["decode_tokens"] == 0


# (seq_lens, query_lens) under ngram speculation with k = 4: verification rows have 1 + k query tokens (fewer when
# the proposer had fewer drafts), decodes first
SPECULATIVE_SPECS = {
    "verification_only": ([40, 64, 300], [5, 5, 5]),
    "verification_and_prefills": ([40, 64, 300, 200, 90], [5, 3, 5, 120, 90]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SPECULATIVE_SPECS))
def test_speculative_verification_rows_are_decodes(name, dtype):
    """vLLM's convention (`_init_reorder_batch_threshold(1, supports_spec_as_decode=True)`): rows of up to 1 + k query
    tokens are decodes, on CPU_ATTN's kernel; PFA takes only the real prefills."""
    spec = SPECULATIVE_SPECS[name]
    metadata, stats = _check(spec, dtype=dtype, speculative_tokens=4)
    decode_rows = [q for q in spec[1] if q <= 5]
    assert metadata.num_existing_path_tokens == sum(decode_rows)
    assert stats["decode_tokens"] == sum(decode_rows) and stats["prefill_tokens"] == sum(spec[1]) - sum(decode_rows)
    assert (metadata.prefill is None) is (name == "verification_only")


def test_builders_never_offer_full_graphs_over_pfa_work():
    """The CPU builder declares NEVER (as CPU_ATTN's); vLLM's resolution then refuses any FULL cudagraph mode for
    it rather than capture a mixed batch with PFA's host-side plan."""
    config = _config(torch.float32, 32)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    support = PFAAttentionBackend.get_builder_cls().get_cudagraph_support(config, spec)
    assert support == AttentionCGSupport.NEVER
    compilation = CompilationConfig(cudagraph_mode="FULL")
    with pytest.raises(ValueError, match="CUDAGraphMode.FULL is not supported with PFA"):
        compilation.resolve_cudagraph_mode_and_sizes(support, "PFA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mixed_medium", "fresh_prefills", "single_prefill", "small_decode"])
def test_kv_sharing_layers_read_their_tokens_from_the_cache(name, dtype):
    """`attn(q, None, None)`: prefill rows read every token of their sequence from the shared cache (PFA), decode
    rows go to CPU_ATTN as usual; the same result as the layer computing with its own K/V, and as CPU_ATTN's."""
    spec = BATCH_SPECS[name]
    STATS.reset()
    shared, _, _ = _run(PFAAttentionBackend, spec, block_size=32, dtype=dtype, shared_kv=True)
    assert STATS.context_tokens == sum(s for s, q in zip(*spec) if q > 1)
    own, _, _ = _run(PFAAttentionBackend, spec, block_size=32, dtype=dtype)
    assert torch.equal(shared, own)
    cpu_attn, _, _ = _run(CPUAttentionBackend, spec, block_size=32, dtype=dtype, shared_kv=True)
    torch.testing.assert_close(shared, cpu_attn, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (query heads, kv heads, head size) per rank, and the spec's rule each breaks
OUTSIDE_THE_SPEC = [
    (512, 8, 64, "num_heads"), (128, 1, 128, "cannot be larger than 64"), (8, 3, 64, "must be divisible by"),
    (4, 2, 576, "d should <= 512"), (256, 256, 256, r"N\*D"),
]


@pytest.mark.parametrize("heads,kv_heads,head_size,rule", OUTSIDE_THE_SPEC)
def test_layers_outside_the_spec_are_refused_when_built(heads, kv_heads, head_size, rule):
    with pytest.raises(ValueError, match=f"The PFA attention backend cannot run this model's attention layers.*{rule}"):
        PFAAttentionBackend.get_impl_cls()(heads, head_size, 0.1, kv_heads, None, None, "auto")


def test_metadata_follows_cpu_attn_conventions():
    """Every field of CPU_ATTN's metadata, for the whole batch; the existing path's part on its own."""
    spec = BATCH_SPECS["mixed_small"]
    _, batch, metadata = _run(PFAAttentionBackend, spec, block_size=32, dtype=torch.float32)
    assert isinstance(metadata, CPUAttentionMetadata)
    common = batch.metadata
    assert metadata.slot_mapping is common.slot_mapping and metadata.block_table is common.block_table_tensor
    assert metadata.query_start_loc is common.query_start_loc and metadata.seq_lens is common.seq_lens
    assert (metadata.num_actual_tokens, metadata.max_query_len, metadata.max_seq_len, metadata.causal) == (
        sum(spec[1]), max(spec[1]), max(spec[0]), True)
    assert metadata.num_existing_path_tokens == 2 and metadata.existing_path.num_actual_tokens == 2
    assert metadata.existing_path.slot_mapping.tolist() == common.slot_mapping[:2].tolist()


@pytest.mark.parametrize("spec", [BATCH_SPECS["small_decode"], ([512, 300, 200, 77], [1, 1, 1, 1])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_only_step_is_cpu_attns_own(spec, dtype, monkeypatch):
    """A step of decodes only: the existing path's metadata is CPU_ATTN's own for the whole batch, field for field,
    and the layer makes one call of CPU_ATTN's forward with its own tensors (no slices, no profiler range around
    it): the same output as CPU_ATTN's, bit for bit."""
    calls = []
    cpu_forward = CPUAttentionBackendImpl.forward

    def recording(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        calls.append((query, output))
        return cpu_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)

    monkeypatch.setattr(CPUAttentionBackendImpl, "forward", recording)
    output, batch, metadata = _run(PFAAttentionBackend, spec, block_size=32, dtype=dtype)
    assert metadata.prefill is None and metadata.num_existing_path_tokens == sum(spec[1])
    assert len(calls) == 1 and calls[0][0] is batch.query and calls[0][1] is output
    cpu_output, _, cpu_metadata = _run(CPUAttentionBackend, spec, block_size=32, dtype=dtype)
    for field in dataclasses.fields(cpu_metadata):
        ours, theirs = getattr(metadata.existing_path, field.name), getattr(cpu_metadata, field.name)
        if field.name == "scheduler_metadata":  # an opaque plan, with bytes two CPU_ATTN builds of a batch leave
            assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)  # differently (uninitialized padding)
        else:
            assert torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs, field.name
    assert torch.equal(output, cpu_output)


def test_encoder_only_context_is_refused():
    with pytest.raises(ValueError, match="encoder-only attention has no KV cache"):
        _run(PFAAttentionBackend, ([40], [8]), block_size=32, dtype=torch.float32, causal=False,
             attn_type=AttentionType.ENCODER_ONLY)


def test_per_request_causality_is_refused():
    config = _config(torch.float32, 32)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    with set_current_vllm_config(config):
        builder = PFAAttentionBackend.get_builder_cls()(spec, [], config, torch.device("cpu"))
    batch = make_paged_batch([(8, 8), (5, 5)], num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                             block_size=32, dtype=torch.float32, isa=builder.isa)
    batch.metadata.causal = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="per-request causality"):
        builder.build(0, batch.metadata)

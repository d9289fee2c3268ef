"""The PFA Ascend adapter (vllm_pfa.backend.ascend_attn) on vllm-ascend's real builder, metadata and impl.

Batches are built as vllm-ascend's model runner hands them to its builder (AscendCommonAttentionMetadata, decodes
first, the block table in 128-token kernel blocks), K/V live in vllm-ascend's cache layout, new tokens are written by
its own `reshape_and_cache`. Outputs are compared with an independent fp64 reference computed from the raw per-request
q/k/v; the torch_npu stand-in's recorded calls show which rows took which path, and with which PFA arguments.
"""

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from vllm.distributed.parallel_state import (
    destroy_distributed_environment,
    destroy_model_parallel,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.utils.network_utils import get_open_port
from vllm.config import (
    AttentionConfig,
    CompilationConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm_ascend.ascend_forward_context import set_ascend_forward_context
from vllm_ascend.attention.attention_v1 import AscendAttentionState
from vllm_ascend.attention.utils import AscendCommonAttentionMetadata

from conftest import vllm_030_names
from vllm_pfa.backend.ascend_attn import PFAAscendAttentionBackend, PFAAscendMetadata, PFAAscendMetadataBuilder
from vllm_pfa.model_builder import build_model
from vllm_pfa.ops import api

KERNEL_BLOCK = 128  # vllm-ascend's kernel block size: its cache and block table are in these
HEAD_SIZE = 64
MASK_SIZE = 2048
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (query_len, seq_len) per request, decodes first as vLLM orders them
BATCHES = {
    "decode_only": [(1, 300), (1, 129), (1, 17)],
    "fresh_prefills": [(100, 100), (37, 37), (260, 260)],
    "prefills_with_context": [(60, 300), (128, 512), (5, 133)],
    "mixed": [(1, 200), (1, 45), (70, 70), (33, 290), (130, 400)],
}
# Under ngram speculation with k = 4 (vllm-ascend's decode_threshold 1 + k): verification rows of up to 5 tokens
SPECULATIVE_TOKENS = 4
SPECULATIVE_BATCHES = {
    "verification_only": [(5, 300), (5, 129), (3, 17)],
    "verification_and_prefills": [(5, 200), (2, 45), (70, 70), (33, 290), (130, 400)],
}


@dataclass
class Layer:
    """What vllm-ascend's impl reads off vLLM's Attention layer."""

    layer_name: str = "model.layers.0.self_attn.attn"
    _k_scale_float: float = 1.0
    _v_scale_float: float = 1.0


@dataclass
class Case:
    requests: list[tuple[int, int]]
    dtype: torch.dtype = torch.float32
    num_heads: int = 8
    num_kv_heads: int = 2
    sliding_window: int | None = None
    spec_block_size: int = KERNEL_BLOCK
    speculative_tokens: int = 0
    shared_kv: bool = False  # a layer reusing another layer's K/V (Gemma-3n, Gemma-4): `attn(q, None, None)`

    @property
    def num_decodes(self) -> int:
        return sum(1 for q, _ in self.requests if q <= 1 + self.speculative_tokens)

    @property
    def decode_requests(self) -> list[tuple[int, int]]:
        return self.requests[: self.num_decodes]


def _vllm_config(case: Case) -> VllmConfig:
    model_config = ModelConfig(model=str(build_model("tiny")), dtype=case.dtype, max_model_len=4096)
    speculative = SpeculativeConfig(
        method="ngram", num_speculative_tokens=case.speculative_tokens, prompt_lookup_max=4, prompt_lookup_min=2,
        target_model_config=model_config, target_parallel_config=ParallelConfig()) if case.speculative_tokens else None
    config = VllmConfig(model_config=model_config, attention_config=AttentionConfig(backend="PFA"),
                        scheduler_config=SchedulerConfig(max_model_len=4096, is_encoder_decoder=False),
                        speculative_config=speculative)
    vllm_030_names(config)
    return config


@pytest.fixture(scope="module", autouse=True)
def single_rank_groups():
    """vllm-ascend's forward context asks vLLM's parallel groups (one rank here, gloo on loopback)."""
    with set_current_vllm_config(_vllm_config(Case(BATCHES["mixed"]))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        ensure_model_parallel_initialized(1, 1)
    yield
    # not cleanup_dist_env_and_memory: it empties the device cache, which needs an NPU's allocator
    destroy_model_parallel()
    destroy_distributed_environment()


def _attn_state(case: "Case") -> AscendAttentionState:
    """As vllm-ascend's model runner (`_build_attn_state`, chunked prefill on) classifies a step; a verification-only
    step under ngram speculation is ChunkedPrefill there too (SpecDecoding is kept for MTP only)."""
    requests = case.requests
    if all(q == s for q, s in requests):
        return AscendAttentionState.PrefillNoCache
    if all(q == 1 for q, _ in requests):
        return AscendAttentionState.DecodeOnly
    return AscendAttentionState.ChunkedPrefill


def _batch(case: Case, seed: int = 0):
    """Random per-request q/k/v, the context written into a (2, blocks, 128, kv_heads, D) cache at scattered kernel
    blocks, and the common metadata vllm-ascend's runner would build."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // KERNEL_BLOCK) for _, s in case.requests]
    num_blocks = sum(blocks_per_req) + 2
    order = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(case.requests), max(blocks_per_req) + 1, dtype=torch.int32)  # spare column: 0s
    kv_cache = torch.zeros(2, num_blocks, KERNEL_BLOCK, case.num_kv_heads, HEAD_SIZE, dtype=case.dtype)
    queries, keys, values, new_slots = [], [], [], []
    used = 0
    for r, ((q_len, seq_len), n_blocks) in enumerate(zip(case.requests, blocks_per_req)):
        block_table[r, :n_blocks] = order[used:used + n_blocks].to(torch.int32)
        used += n_blocks
        positions = torch.arange(seq_len)
        slots = block_table[r, positions // KERNEL_BLOCK].long() * KERNEL_BLOCK + positions % KERNEL_BLOCK
        k = torch.randn(seq_len, case.num_kv_heads, HEAD_SIZE, generator=gen).to(case.dtype)
        v = torch.randn(seq_len, case.num_kv_heads, HEAD_SIZE, generator=gen).to(case.dtype)
        context = seq_len - q_len
        for half, tokens in ((0, k), (1, v)):
            kv_cache[half].view(-1, case.num_kv_heads, HEAD_SIZE)[slots[:context]] = tokens[:context]
        queries.append(torch.randn(q_len, case.num_heads, HEAD_SIZE, generator=gen).to(case.dtype))
        keys.append(k)
        values.append(v)
        new_slots.append(slots[context:])
    query_lens = [q for q, _ in case.requests]
    seq_lens = torch.tensor([s for _, s in case.requests], dtype=torch.int32)
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    metadata = AscendCommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), num_computed_tokens_cpu=seq_lens - torch.tensor(query_lens, dtype=torch.int32),
        num_reqs=len(case.requests), num_actual_tokens=sum(query_lens), max_query_len=max(query_lens),
        max_seq_len=int(seq_lens.max()), block_table_tensor=block_table, slot_mapping=torch.cat(new_slots),
        causal=True, actual_seq_lengths_q=query_start_loc[1:].tolist(), attn_state=_attn_state(case),
        positions=torch.cat([torch.arange(s - q, s) for q, s in case.requests]))
    new = lambda tokens: torch.cat([t[s - q:] for t, (q, s) in zip(tokens, case.requests)])  # noqa: E731
    return torch.cat(queries), new(keys), new(values), kv_cache, metadata, queries, keys, values


def _reference(case: Case, queries, keys, values) -> torch.Tensor:
    """fp64 softmax attention per request: new rows at the end of the sequence, causal, vLLM's window (i - j < W)."""
    rows = []
    group = case.num_heads // case.num_kv_heads
    for q, k, v in zip(queries, keys, values):
        i = torch.arange(q.shape[0]).unsqueeze(1) + (k.shape[0] - q.shape[0])
        j = torch.arange(k.shape[0]).unsqueeze(0)
        keep = (j <= i) & ((i - j < case.sliding_window) if case.sliding_window else True)
        k64 = k.double().repeat_interleave(group, 1)
        v64 = v.double().repeat_interleave(group, 1)
        scores = torch.einsum("qnd,knd->nqk", q.double(), k64) / math.sqrt(HEAD_SIZE)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        rows.append(torch.einsum("nqk,knd->qnd", probs, v64))
    return torch.cat(rows)


def _run(case: Case, monkeypatch=None, force_npu_branch: bool = True):
    """The adapter's forward on one batch; returns (output, reference, built metadata)."""
    config = _vllm_config(case)
    spec_cls = SlidingWindowSpec if case.sliding_window else FullAttentionSpec
    spec = spec_cls(block_size=case.spec_block_size, num_kv_heads=case.num_kv_heads, head_size=HEAD_SIZE,
                    dtype=case.dtype, **({"sliding_window": case.sliding_window} if case.sliding_window else {}))
    query, key, value, kv_cache, common, queries, keys, values = _batch(case)
    target_layer = None
    if case.shared_kv:  # the target layer has written the new tokens too; this layer gets no K/V of its own
        for half, tokens in ((0, key), (1, value)):
            kv_cache[half].view(-1, case.num_kv_heads, HEAD_SIZE)[common.slot_mapping.long()] = tokens
        key = value = None
        target_layer = "model.layers.0.self_attn.attn"
    if force_npu_branch:  # the operator's NPU branch: PFA calls reach the torch_npu stand-in (recorded)
        monkeypatch.setattr(api, "runs_on_npu", lambda tensor: True)
    with set_current_vllm_config(config):
        builder = PFAAscendAttentionBackend.get_builder_cls()(spec, [Layer.layer_name], config, torch.device("cpu"))
        metadata = builder.build(0, common)
        impl = PFAAscendAttentionBackend.get_impl_cls()(
            num_heads=case.num_heads, head_size=HEAD_SIZE, scale=1 / math.sqrt(HEAD_SIZE),
            num_kv_heads=case.num_kv_heads, alibi_slopes=None, sliding_window=case.sliding_window,
            kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
            kv_sharing_target_layer_name=target_layer)
        output = torch.full_like(query, float("nan"))
        with set_ascend_forward_context(metadata, config, num_tokens=query.shape[0]):
            impl.forward(Layer(), query, key, value, kv_cache, metadata, output)
    return output, _reference(case, queries, keys, values), metadata


def _assert_close(case: Case, output, expected):
    tol = TOLERANCE[case.dtype]
    torch.testing.assert_close(output.double(), expected, atol=tol, rtol=tol)


def _pfa_calls(calls):
    return [c for c in calls if c.name == "npu_prompt_flash_attention"]


def _check_pfa_arguments(case: Case, calls) -> None:
    """PFA's arguments as the spec and the design require, and padding rows zeroed for the device."""
    prefills = case.requests[case.num_decodes:]
    pfa = _pfa_calls(calls)
    assert pfa, "prefill rows must go through PFA"
    assert sorted(q for c in pfa for q in c.kwargs["actual_seq_lengths"]) == sorted(q for q, _ in prefills)
    assert sorted(s for c in pfa for s in c.kwargs["actual_seq_lengths_kv"]) == sorted(s for _, s in prefills)
    mask = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE), diagonal=1).to(torch.int8)
    for call in pfa:
        kw = call.kwargs
        assert kw["input_layout"] == "BSND" and kw["num_heads"] == case.num_heads
        assert kw["num_key_value_heads"] == case.num_kv_heads and kw["scale_value"] == 1 / math.sqrt(HEAD_SIZE)
        assert kw["atten_mask"].dtype == torch.int8 and torch.equal(kw["atten_mask"], mask)
        if case.sliding_window:
            assert (kw["sparse_mode"], kw["pre_tokens"], kw["next_tokens"]) == (4, case.sliding_window - 1, 0)
        else:
            assert kw["sparse_mode"] == 3
        for b, (q_len, seq_len) in enumerate(zip(kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"])):
            assert not kw["query"][b, q_len:].any() and not kw["key"][b, seq_len:].any()
            assert not kw["value"][b, seq_len:].any()


def _check_decode_path(case: Case, calls) -> None:
    """Decode rows on vllm-ascend's own path (FIA or paged attention), and nothing else there."""
    decode_calls = [c for c in calls if c.name in ("npu_fused_infer_attention_score", "_npu_paged_attention")]
    if case.num_decodes == 0:
        assert not decode_calls
        return
    (call,) = decode_calls
    assert call.kwargs["num_tokens"] == sum(q for q, _ in case.decode_requests)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_batches_match_reference_with_decode_on_vllm_ascend_and_prefill_on_pfa(monkeypatch, calls, batch, dtype):
    case = Case(BATCHES[batch], dtype=dtype)
    output, expected, metadata = _run(case, monkeypatch)
    assert isinstance(metadata, PFAAscendMetadata)
    _assert_close(case, output, expected)
    _check_decode_path(case, calls)
    if batch == "decode_only":
        assert metadata.pfa_prefill is None and not _pfa_calls(calls)
    else:
        _check_pfa_arguments(case, calls)
    assert not any(c.name == "npu_fusion_attention" for c in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", list(SPECULATIVE_BATCHES))
def test_speculative_verification_rows_stay_on_vllm_ascend(monkeypatch, calls, batch, dtype):
    """Under a speculative config vllm-ascend's builder counts rows of up to 1 + k query tokens as decodes: they stay
    on its path (FIA in TND, not paged attention, as vllm-ascend does with a speculative config), with the per-row
    lengths vllm-ascend uses (cumulative query ends, per-request kv lengths); PFA gets the real prefills only."""
    case = Case(SPECULATIVE_BATCHES[batch], dtype=dtype, speculative_tokens=SPECULATIVE_TOKENS)
    output, expected, metadata = _run(case, monkeypatch)
    _assert_close(case, output, expected)
    assert not [c for c in calls if c.name == "_npu_paged_attention"]
    (fia,) = [c for c in calls if c.name == "npu_fused_infer_attention_score"]
    assert fia.kwargs["paged"] and fia.kwargs["sparse_mode"] == 3
    assert fia.kwargs["query_lens"] == list(itertools.accumulate(q for q, _ in case.decode_requests))
    assert fia.kwargs["kv_lens"] == [s for _, s in case.decode_requests]
    if batch == "verification_only":
        assert metadata.pfa_prefill is None and not _pfa_calls(calls)
    else:
        _check_pfa_arguments(case, calls)


def test_graph_capture_is_declared_truthfully():
    """vllm-ascend's builder answers ALWAYS (a mixed prefill batch may be captured in a full graph, freezing PFA's
    host-side plan); PFA's answers UNIFORM_BATCH, and vLLM's own resolution of a FULL request then keeps full graphs
    for uniform decode batches only, mixed batches running without one."""
    case = Case(BATCHES["mixed"])
    config = _vllm_config(case)
    spec = FullAttentionSpec(block_size=KERNEL_BLOCK, num_kv_heads=case.num_kv_heads, head_size=HEAD_SIZE,
                             dtype=case.dtype)
    vllm_ascend_support = PFAAscendMetadataBuilder.__mro__[1].get_cudagraph_support(config, spec)
    support = PFAAscendMetadataBuilder.get_cudagraph_support(config, spec)
    assert vllm_ascend_support == AttentionCGSupport.ALWAYS and support == AttentionCGSupport.UNIFORM_BATCH
    for requested in ("FULL", "FULL_AND_PIECEWISE"):
        resolved = CompilationConfig(cudagraph_mode=requested).resolve_cudagraph_mode_and_sizes(
            min_cg_support=support, min_cg_attn_backend="PFAAscendAttentionBackend")
        assert resolved.mixed_mode() != resolved.FULL and resolved.decode_mode() == resolved.FULL, resolved


@pytest.mark.parametrize("batch", ["mixed", "fresh_prefills", "prefills_with_context"])
def test_kv_sharing_layer_reads_its_tokens_from_the_shared_cache(monkeypatch, calls, batch):
    """A KV-sharing layer (no K/V of its own, vllm-ascend writes nothing for it): PFA reads every token of each
    prefill's sequence from the shared cache, decodes stay on vllm-ascend's path; against the reference."""
    case = Case(BATCHES[batch], shared_kv=True)
    output, expected, _ = _run(case, monkeypatch)
    _assert_close(case, output, expected)
    _check_decode_path(case, calls)
    _check_pfa_arguments(case, calls)
    assert not [c for c in calls if c.name == "npu_scatter_pa_kv_cache"]


@pytest.mark.parametrize("heads,kv_heads,head_size,rule", [
    (512, 8, 64, "num_heads"), (128, 1, 128, "cannot be larger than 64"), (4, 2, 576, "d should <= 512"),
    (256, 256, 256, r"N\*D"),
])
def test_layers_outside_the_spec_are_refused_when_built(heads, kv_heads, head_size, rule):
    """On an NPU the operator hands its arguments to torch_npu unchecked: the spec's limits on the per-rank heads
    are checked when the layer is built, at start-up, instead of surfacing as a kernel error on the first prefill."""
    with set_current_vllm_config(_vllm_config(Case(BATCHES["mixed"]))), \
            pytest.raises(ValueError, match=f"cannot run this model's attention layers.*{rule}"):
        PFAAscendAttentionBackend.get_impl_cls()(
            num_heads=heads, head_size=head_size, scale=0.1, num_kv_heads=kv_heads, alibi_slopes=None,
            sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
            kv_sharing_target_layer_name=None)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 1), (6, 2)], ids=["mha", "mqa", "gqa3"])
def test_head_groupings(monkeypatch, calls, num_heads, num_kv_heads):
    case = Case(BATCHES["mixed"], num_heads=num_heads, num_kv_heads=num_kv_heads)
    output, expected, _ = _run(case, monkeypatch)
    _assert_close(case, output, expected)
    _check_pfa_arguments(case, calls)


def test_sliding_window_prefill_is_pfa_band_mode(monkeypatch, calls):
    case = Case(BATCHES["prefills_with_context"], sliding_window=64)
    output, expected, _ = _run(case, monkeypatch)
    _assert_close(case, output, expected)
    _check_pfa_arguments(case, calls)


@pytest.mark.parametrize("batch", ["prefills_with_context", "mixed"])
def test_spec_block_size_larger_than_kernel_block(monkeypatch, calls, batch):
    """Hybrid / multi-group models: spec blocks of 256 tokens over vllm-ascend's 128-token kernel blocks."""
    case = Case(BATCHES[batch], spec_block_size=2 * KERNEL_BLOCK)
    output, expected, _ = _run(case, monkeypatch)
    _assert_close(case, output, expected)
    _check_pfa_arguments(case, calls)


def test_npu_branch_gives_the_cpu_implementations_results(monkeypatch, calls):
    """The operator's NPU branch (forced) reaches torch_npu.npu_prompt_flash_attention, with the same results as the
    CPU implementation called directly."""
    case = Case(BATCHES["mixed"])
    direct, _, _ = _run(case, force_npu_branch=False)
    assert not _pfa_calls(calls)
    through_npu, _, _ = _run(case, monkeypatch)
    assert _pfa_calls(calls)
    torch.testing.assert_close(through_npu, direct, atol=0, rtol=0)

"""What the adapter's contract tests share: batches as vllm-ascend's model runners hand them over, K/V caches in the
layouts its runners allocate, the adapter's builder and impl driven through vllm-ascend's own `build` and `forward`,
and the checks (an independent fp64 reference; PFA's recorded arguments).

Batches: random per-request q/k/v, the context written into the cache at scattered 128-token kernel blocks (the
block table is in those), decodes first as vLLM orders them. The new tokens are written by vllm-ascend's own
`reshape_and_cache` when the layer runs, as on an NPU.
"""

import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from vllm.config import (
    AttentionConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.parallel_state import (
    destroy_distributed_environment,
    destroy_model_parallel,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.utils.network_utils import get_open_port
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm_ascend.ascend_forward_context import set_ascend_forward_context
from vllm_ascend.attention.attention_v1 import AscendAttentionState
from vllm_ascend.attention.utils import AscendCommonAttentionMetadata

from conftest import vllm_030_names
from vllm_pfa.backend.ascend_attn import PFAAscendAttentionBackend
from vllm_pfa.model_builder import build_model
from vllm_pfa.ops import api

KERNEL_BLOCK = 128  # vllm-ascend's kernel block size: its cache and block table are in these
HEAD_SIZE = 64
MASK_SIZE = 2048
MAX_MODEL_LEN = 4096
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
LAYER_NAME = "model.layers.0.self_attn.attn"

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
# How vllm-ascend's runners lay one layer's K/V out: a (2, blocks, block, kv_heads, head) tensor (as the contract
# suite used to), or block-interleaved K and V views of one allocation, built by the V2 runner's own
# `_reshape_combined_attention_kv_cache` or with exactly the strides of the V1 runner's `as_strided` (inline in
# `NPUModelRunner.initialize_kv_cache_tensors`, not callable on its own).
KV_LAYOUTS = ("contiguous", "runner_v1", "runner_v2")


@dataclass
class Layer:
    """What vllm-ascend's impl reads off vLLM's Attention layer."""

    layer_name: str = LAYER_NAME
    _k_scale_float: float = 1.0
    _v_scale_float: float = 1.0


@dataclass
class Case:
    requests: list[tuple[int, int]]
    dtype: torch.dtype = torch.float32
    num_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = HEAD_SIZE
    sliding_window: int | None = None
    spec_block_size: int = KERNEL_BLOCK
    speculative_tokens: int = 0
    shared_kv: bool = False  # a layer reusing another layer's K/V (Gemma-3n, Gemma-4): `attn(q, None, None)`
    kv_layout: str = "runner_v2"
    max_num_batched_tokens: int = 2048

    @property
    def num_decodes(self) -> int:
        """The leading requests of at most 1 + k new tokens (the builder splits at the first longer one)."""
        return len(list(itertools.takewhile(lambda r: r[0] <= 1 + self.speculative_tokens, self.requests)))

    @property
    def decode_requests(self) -> list[tuple[int, int]]:
        return self.requests[: self.num_decodes]

    @property
    def prefill_requests(self) -> list[tuple[int, int]]:
        return self.requests[self.num_decodes:]


def vllm_config(case: Case, **speculative) -> VllmConfig:
    model_config = ModelConfig(model=str(build_model("tiny")), dtype=case.dtype, max_model_len=MAX_MODEL_LEN)
    spec = SpeculativeConfig(
        method="ngram", num_speculative_tokens=case.speculative_tokens, prompt_lookup_max=4, prompt_lookup_min=2,
        target_model_config=model_config, target_parallel_config=ParallelConfig(), **speculative,
    ) if case.speculative_tokens else None
    config = VllmConfig(model_config=model_config, attention_config=AttentionConfig(backend="PFA"),
                        scheduler_config=SchedulerConfig(max_model_len=MAX_MODEL_LEN, is_encoder_decoder=False,
                                                         max_num_batched_tokens=case.max_num_batched_tokens),
                        speculative_config=spec)
    vllm_030_names(config)
    return config


@pytest.fixture(scope="module")
def single_rank_groups():
    """vllm-ascend's forward context asks vLLM's parallel groups (one rank here, gloo on loopback)."""
    with set_current_vllm_config(vllm_config(Case(BATCHES["mixed"]))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        ensure_model_parallel_initialized(1, 1)
    yield
    # not cleanup_dist_env_and_memory: it empties the device cache, which needs an NPU's allocator
    destroy_model_parallel()
    destroy_distributed_environment()


RUNNER_MODULES = {"runner_v1": "vllm_ascend.worker.model_runner_v1", "runner_v2": "vllm_ascend.worker.v2.attn_utils"}


def runner_gives_contiguous_kv(case: Case, config: VllmConfig, impl) -> bool:
    """The runner's own decision for this layer: `requires_contiguous_pa_kv_cache` as its module calls it (the
    name it imported, which vllm-pfa's KV-cache patch replaces)."""
    import importlib

    decide = importlib.import_module(RUNNER_MODULES[case.kv_layout]).requires_contiguous_pa_kv_cache
    with set_current_vllm_config(config):
        return decide(SimpleNamespace(impl=impl), config, kv_cache_spec(case))


def kv_cache(case: Case, num_blocks: int,
             contiguous_pa: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One layer's zeroed K/V cache in `case.kv_layout`; with `contiguous_pa` (the runner decided the layer needs
    contiguous K/V for paged attention) two allocations, as both runners then make."""
    shape = (2, num_blocks, KERNEL_BLOCK, case.num_kv_heads, case.head_size)
    if case.kv_layout == "contiguous":
        return torch.zeros(shape, dtype=case.dtype)
    if contiguous_pa:
        return torch.zeros(shape[1:], dtype=case.dtype), torch.zeros(shape[1:], dtype=case.dtype)
    hidden = math.prod(shape[2:])
    raw = torch.zeros(2 * num_blocks * hidden * case.dtype.itemsize, dtype=torch.int8)  # the runners' int8 pages
    if case.kv_layout == "runner_v2":
        from vllm_ascend.worker.v2.attn_utils import _reshape_combined_attention_kv_cache

        return _reshape_combined_attention_kv_cache(raw, shape, case.dtype, 2 * hidden * case.dtype.itemsize)
    assert case.kv_layout == "runner_v1"
    typed = raw.view(case.dtype)
    dense = [math.prod(shape[dim + 1:]) for dim in range(len(shape))]
    combined = torch.as_strided(typed, size=shape, stride=(hidden, 2 * hidden, *dense[2:]),
                                storage_offset=typed.storage_offset())
    return combined[0], combined[1]


def write_tokens(cache, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Token t into slot `slots[t]` (block * KERNEL_BLOCK + offset) of K and V, whatever the layout's strides."""
    blocks, offsets = slots // KERNEL_BLOCK, slots % KERNEL_BLOCK
    for half, tokens in ((0, keys), (1, values)):
        cache[half][blocks, offsets] = tokens


@dataclass
class Batch:
    case: Case
    query: torch.Tensor  # [T, heads, D]: every request's new rows, in order
    key: torch.Tensor | None  # [T, kv_heads, D]; None for a KV-sharing layer
    value: torch.Tensor | None
    kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    block_table: torch.Tensor  # [R, blocks] int32, kernel blocks
    slot_mapping: torch.Tensor  # [T] the new rows' slots
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32, exact
    queries: list[torch.Tensor]  # per request, for the reference
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.query.shape[0]


def make_batch(case: Case, seed: int = 0, contiguous_pa: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // KERNEL_BLOCK) for _, s in case.requests]
    num_blocks = sum(blocks_per_req) + 2
    order = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(case.requests), max(blocks_per_req) + 1, dtype=torch.int32)  # spare column: 0s
    cache = kv_cache(case, num_blocks, contiguous_pa)
    queries, keys, values, new_slots = [], [], [], []
    used = 0
    for r, ((q_len, seq_len), n_blocks) in enumerate(zip(case.requests, blocks_per_req)):
        block_table[r, :n_blocks] = order[used:used + n_blocks].to(torch.int32)
        used += n_blocks
        positions = torch.arange(seq_len)
        slots = block_table[r, positions // KERNEL_BLOCK].long() * KERNEL_BLOCK + positions % KERNEL_BLOCK
        k = torch.randn(seq_len, case.num_kv_heads, case.head_size, generator=gen).to(case.dtype)
        v = torch.randn(seq_len, case.num_kv_heads, case.head_size, generator=gen).to(case.dtype)
        context = seq_len - q_len
        write_tokens(cache, slots[:context], k[:context], v[:context])
        queries.append(torch.randn(q_len, case.num_heads, case.head_size, generator=gen).to(case.dtype))
        keys.append(k)
        values.append(v)
        new_slots.append(slots[context:])
    query_lens = [q for q, _ in case.requests]
    new = lambda tokens: torch.cat([t[s - q:] for t, (q, s) in zip(tokens, case.requests)])  # noqa: E731
    key, value = new(keys), new(values)
    slot_mapping = torch.cat(new_slots)
    if case.shared_kv:  # the target layer has written the new tokens too; this layer gets no K/V of its own
        write_tokens(cache, slot_mapping, key, value)
        key = value = None
    return Batch(case=case, query=torch.cat(queries), key=key, value=value, kv_cache=cache, block_table=block_table,
                 slot_mapping=slot_mapping,
                 query_start_loc=torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
                 seq_lens=torch.tensor([s for _, s in case.requests], dtype=torch.int32),
                 queries=queries, keys=keys, values=values)


def attn_state(case: Case) -> AscendAttentionState:
    """As vllm-ascend's model runner (`_build_attn_state`, chunked prefill on) classifies a step; a verification-only
    step under ngram speculation is ChunkedPrefill there too (SpecDecoding is kept for MTP only)."""
    requests = case.requests
    if all(q == s for q, s in requests):
        return AscendAttentionState.PrefillNoCache
    if all(q == 1 for q, _ in requests):
        return AscendAttentionState.DecodeOnly
    return AscendAttentionState.ChunkedPrefill


def hand_built_metadata(batch: Batch) -> AscendCommonAttentionMetadata:
    """The common metadata with every field exact and nothing padded (the runner-built batches: test_runners)."""
    case, query_start_loc, seq_lens = batch.case, batch.query_start_loc, batch.seq_lens
    query_lens = [q for q, _ in case.requests]
    return AscendCommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), num_computed_tokens_cpu=seq_lens - torch.tensor(query_lens, dtype=torch.int32),
        num_reqs=len(case.requests), num_actual_tokens=sum(query_lens), max_query_len=max(query_lens),
        max_seq_len=int(seq_lens.max()), block_table_tensor=batch.block_table, slot_mapping=batch.slot_mapping,
        causal=True, actual_seq_lengths_q=query_start_loc[1:].tolist(), attn_state=attn_state(case),
        positions=torch.cat([torch.arange(s - q, s) for q, s in case.requests]))


def kv_cache_spec(case: Case):
    spec_cls = SlidingWindowSpec if case.sliding_window else FullAttentionSpec
    return spec_cls(block_size=case.spec_block_size, num_kv_heads=case.num_kv_heads, head_size=case.head_size,
                    dtype=case.dtype, **({"sliding_window": case.sliding_window} if case.sliding_window else {}))


def make_builder(case: Case, config: VllmConfig):
    with set_current_vllm_config(config):
        return PFAAscendAttentionBackend.get_builder_cls()(kv_cache_spec(case), [LAYER_NAME], config,
                                                           torch.device("cpu"))


def make_impl(case: Case, config: VllmConfig):
    with set_current_vllm_config(config):
        return PFAAscendAttentionBackend.get_impl_cls()(
            num_heads=case.num_heads, head_size=case.head_size, scale=1 / math.sqrt(case.head_size),
            num_kv_heads=case.num_kv_heads, alibi_slopes=None, sliding_window=case.sliding_window,
            kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
            kv_sharing_target_layer_name=LAYER_NAME if case.shared_kv else None)


def forward(impl, metadata, batch: Batch, config: VllmConfig, num_input_tokens: int | None = None) -> torch.Tensor:
    """vllm-ascend's `forward` on the batch, its rows padded to `num_input_tokens` (graph / sequence-parallel
    padding: random rows) as a runner pads them; the output starts as NaN."""
    padding = (num_input_tokens or batch.num_tokens) - batch.num_tokens
    pad = lambda t: None if t is None else torch.cat([t, torch.randn(padding, *t.shape[1:]).to(t.dtype)])  # noqa
    query, key, value = pad(batch.query), pad(batch.key), pad(batch.value)
    output = torch.full_like(query, float("nan"))
    with set_current_vllm_config(config), set_ascend_forward_context(metadata, config, num_tokens=query.shape[0]):
        impl.forward(Layer(), query, key, value, batch.kv_cache, metadata, output)
    return output


def run(case: Case, monkeypatch=None, force_npu_branch: bool = True, config: VllmConfig | None = None):
    """The adapter on one hand-built batch, its cache laid out as the runner of `case.kv_layout` lays it out for
    this layer; returns (output, reference, built metadata)."""
    config = config or vllm_config(case)
    impl = make_impl(case, config)
    contiguous_pa = case.kv_layout != "contiguous" and runner_gives_contiguous_kv(case, config, impl)
    batch = make_batch(case, contiguous_pa=contiguous_pa)
    if force_npu_branch:  # the operator's NPU branch: PFA calls reach the torch_npu stand-in (recorded)
        monkeypatch.setattr(api, "runs_on_npu", lambda tensor: True)
    metadata = make_builder(case, config).build(0, hand_built_metadata(batch))
    output = forward(impl, metadata, batch, config)
    return output, reference(case, batch), metadata


def reference(case: Case, batch: Batch) -> torch.Tensor:
    """fp64 softmax attention per request: new rows at the end of the sequence, causal, vLLM's window (i - j < W)."""
    rows = []
    group = case.num_heads // case.num_kv_heads
    for q, k, v in zip(batch.queries, batch.keys, batch.values):
        i = torch.arange(q.shape[0]).unsqueeze(1) + (k.shape[0] - q.shape[0])
        j = torch.arange(k.shape[0]).unsqueeze(0)
        keep = (j <= i) & ((i - j < case.sliding_window) if case.sliding_window else True)
        k64 = k.double().repeat_interleave(group, 1)
        v64 = v.double().repeat_interleave(group, 1)
        scores = torch.einsum("qnd,knd->nqk", q.double(), k64) / math.sqrt(case.head_size)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        rows.append(torch.einsum("nqk,knd->qnd", probs, v64))
    return torch.cat(rows)


def assert_close(case: Case, output, expected):
    tol = TOLERANCE[case.dtype]
    torch.testing.assert_close(output.double(), expected, atol=tol, rtol=tol)


def pfa_calls(calls):
    return [c for c in calls if c.name == "npu_prompt_flash_attention"]


def expected_kv_len(case: Case, query_len: int, seq_len: int) -> int:
    """The keys PFA gets for a request: all of them, or for a window layer its window's (vLLM: j > i - W)."""
    if case.sliding_window is None:
        return seq_len
    return seq_len - max(0, seq_len - query_len - (case.sliding_window - 1))


def check_pfa_arguments(case: Case, calls, prefills: list[tuple[int, int]] | None = None) -> None:
    """PFA's arguments as the spec and the design require: the true lengths of the true prefills (no padding
    request, no upper bound), and padding positions holding a real row of their request (finite, never
    uninitialized memory)."""
    prefills = case.prefill_requests if prefills is None else prefills
    pfa = pfa_calls(calls)
    assert pfa, "prefill rows must go through PFA"
    assert sorted(q for c in pfa for q in c.kwargs["actual_seq_lengths"]) == sorted(q for q, _ in prefills)
    assert sorted(s for c in pfa for s in c.kwargs["actual_seq_lengths_kv"]) == \
        sorted(expected_kv_len(case, q, s) for q, s in prefills)
    mask = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE), diagonal=1).to(torch.int8)
    for call in pfa:
        kw = call.kwargs
        assert kw["input_layout"] == "BSND" and kw["num_heads"] == case.num_heads
        assert kw["num_key_value_heads"] == case.num_kv_heads and kw["scale_value"] == 1 / math.sqrt(case.head_size)
        assert kw["atten_mask"].dtype == torch.int8 and torch.equal(kw["atten_mask"], mask)
        if case.sliding_window:
            assert (kw["sparse_mode"], kw["pre_tokens"], kw["next_tokens"]) == (4, case.sliding_window - 1, 0)
        else:
            assert kw["sparse_mode"] == 3
        for b, (q_len, kv_len) in enumerate(zip(kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"])):
            for name, length in (("query", q_len), ("key", kv_len), ("value", kv_len)):
                rows = kw[name][b]
                assert rows.isfinite().all()
                assert (rows[length:] == rows[length - 1]).all(), f"{name} padding must repeat a real row"


def check_decode_path(case: Case, calls, decodes: list[tuple[int, int]] | None = None) -> None:
    """Decode rows on vllm-ascend's own path (FIA or paged attention), and nothing else there."""
    decodes = case.decode_requests if decodes is None else decodes
    decode_calls = [c for c in calls if c.name in ("npu_fused_infer_attention_score", "_npu_paged_attention")]
    if not decodes:
        assert not decode_calls
        return
    (call,) = decode_calls
    assert call.kwargs["num_tokens"] == sum(q for q, _ in decodes)

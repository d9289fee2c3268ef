"""The adapter as vllm-ascend's model runners drive it on an NPU: their KV-cache layouts (block-interleaved K/V views,
or contiguous K/V for layers sent to paged attention), the device work per layer, the device memory PFA needs,
and vllm-ascend's KV-transfer window."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vllm.config import CUDAGraphMode
from vllm_ascend.attention import utils as ascend_utils
from vllm_ascend.attention.attention_v1 import AscendAttentionBackendImpl
from vllm_ascend.distributed.kv_transfer.kv_pool.ascend_store import attention_fence

import torch_npu
from harness import (
    BATCHES,
    RUNNER_MODULES,
    Case,
    assert_close,
    check_decode_path,
    check_pfa_arguments,
    forward,
    hand_built_metadata,
    kv_cache_spec,
    make_batch,
    make_builder,
    make_impl,
    pfa_calls,
    run,
    runner_gives_contiguous_kv,
    single_rank_groups,  # noqa: F401  (module fixture)
    vllm_config,
)
from vllm_pfa.backend import ascend_attn
from vllm_pfa.backend.staging import STAGING
from vllm_pfa.ops import api
from vllm_pfa_patches.kv_cache import ascend_contiguous_pa_layout

pytestmark = pytest.mark.usefixtures("single_rank_groups")

WIDE_HEADS = dict(num_heads=4, num_kv_heads=1, head_size=512)  # Gemma-4's global layers: paged-attention decode


# --- layout: what the runners give a PFA layer ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(RUNNER_MODULES))
def test_pfa_layers_get_the_layout_vllm_ascend_gives_its_own_for_paged_attention(layout):
    """Head size 512: vllm-ascend decodes through `_npu_paged_attention` and allocates that layer's K/V contiguous
    for it, but only for its own impl type; with vllm-pfa's KV-cache patch a PFA layer gets the same answer."""
    case = Case(BATCHES["mixed"], kv_layout=layout, **WIDE_HEADS)
    config = vllm_config(case)
    impl = make_impl(case, config)
    as_vllm_ascend = object.__new__(AscendAttentionBackendImpl)
    as_vllm_ascend.__dict__ = impl.__dict__
    original = ascend_utils.requires_contiguous_pa_kv_cache.__wrapped__
    spec = kv_cache_spec(case)
    assert original(SimpleNamespace(impl=as_vllm_ascend), config, spec) is True
    assert original(SimpleNamespace(impl=impl), config, spec) is False  # the finding: withheld from PFA layers
    assert runner_gives_contiguous_kv(case, config, impl) is True


def test_the_patch_reaches_callers_imported_before_it_and_is_idempotent():
    import importlib

    callers = [importlib.import_module(name) for name in RUNNER_MODULES.values()]
    assert ascend_contiguous_pa_layout.apply() is True
    assert ascend_contiguous_pa_layout.apply() is True
    patched = ascend_utils.requires_contiguous_pa_kv_cache
    assert getattr(patched, "_vllm_pfa_patched", False)
    assert all(module.requires_contiguous_pa_kv_cache is patched for module in callers)
    assert not getattr(patched.__wrapped__, "_vllm_pfa_patched", False)  # wrapped once


@pytest.mark.parametrize("layout", list(RUNNER_MODULES))
def test_head_size_512_decodes_through_paged_attention_on_the_layout_the_runner_allocates(monkeypatch, calls,
                                                                                         layout):
    case = Case(BATCHES["mixed"], kv_layout=layout, **WIDE_HEADS)
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    (paged,) = [c for c in calls if c.name == "_npu_paged_attention"]  # the stand-in refuses a strided cache
    assert paged.kwargs["num_tokens"] == case.num_decodes
    check_pfa_arguments(case, calls)


@pytest.mark.parametrize("layout", list(RUNNER_MODULES))
def test_full_decode_only_with_pa_shape_list(monkeypatch, calls, layout):
    """FULL_DECODE_ONLY with `pa_shape_list`: vllm-ascend sends decode batches of those sizes to paged attention
    and gives its layers contiguous K/V; PFA layers too."""
    case = Case(BATCHES["mixed"], kv_layout=layout)
    monkeypatch.setattr(ascend_utils, "get_ascend_config", lambda: SimpleNamespace(pa_shape_list=[case.num_decodes]))
    config = vllm_config(case)
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
    assert runner_gives_contiguous_kv(case, config, make_impl(case, config)) is True
    output, expected, _ = run(case, monkeypatch, config=config)
    assert_close(case, output, expected)
    assert [c.name for c in calls if c.name == "_npu_paged_attention"] == ["_npu_paged_attention"]


# --- device work per layer ------------------------------------------------------------------------------------------
class _DeviceOps(TorchDispatchMode):
    """Counts the non-view aten ops our code runs (torch_npu's own ops, the stand-in's insides, are not ours)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False
        self.largest_output = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func.is_view and func.__name__ not in ("detach.default",):
            self.ops.append(str(func))
            for tensor in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(tensor, torch.Tensor):
                    self.largest_output = max(self.largest_output, tensor.numel())
        return out


@pytest.mark.parametrize("layout", ["runner_v1", "runner_v2"])
def test_per_layer_work_is_one_gather_per_call_without_copying_the_cache(monkeypatch, calls, layout):
    """On the runners' interleaved K/V: per layer and PFA call, the packed query, one gather of K and V together
    (index_select on the cache storage: no contiguous copy of a cache half), PFA, one index_select back into the
    output; the per-step indices (block-table lookups) are built by the first layer and reused."""
    case = Case(BATCHES["mixed"], kv_layout=layout)
    monkeypatch.setattr(api, "runs_on_npu", lambda tensor: True)
    config = vllm_config(case)
    batch = make_batch(case)
    metadata = make_builder(case, config).build(0, hand_built_metadata(batch))
    impl = make_impl(case, config)
    counter = _DeviceOps()
    real_pfa = ascend_attn.npu_prompt_flash_attention

    def uncounted(*args, **kwargs):
        counter.paused = True
        try:
            return real_pfa(*args, **kwargs)
        finally:
            counter.paused = False

    monkeypatch.setattr(ascend_attn, "npu_prompt_flash_attention", uncounted)
    monkeypatch.setattr(impl, "_forward_decodes", lambda *args: None)  # vllm-ascend's decode rows: its own ops
    plan, indices = metadata.pfa_prefill, metadata.pfa_indices
    rows = slice(plan.token_start, plan.token_start + plan.num_tokens)
    impl.key_cache, impl.value_cache = batch.kv_cache
    ascend_attn.PFAAscendAttentionImpl._run_pfa(impl, batch.query, batch.key, batch.value, metadata,
                                                torch.empty_like(batch.query))  # first layer: builds the rows
    output = torch.full_like(batch.query, float("nan"))
    with counter:
        impl._run_pfa(batch.query, batch.key, batch.value, metadata, output)  # a later layer of the step
    assert len(plan.calls) == 1 and indices[0].batch == 3
    assert plan.gather is None and all(call.block_ids is None for call in plan.calls)  # no per-request block copies
    assert sorted(counter.ops) == sorted(["aten.index_select.out"] * 3), counter.ops  # query, K+V, output
    # the largest tensor written is the call's own K/V (nothing the size of a cache half is copied)
    assert counter.largest_output == 2 * indices[0].batch * indices[0].max_kv_len * case.num_kv_heads * case.head_size
    assert len(pfa_calls(calls)) == 2 and not output[rows].isnan().any()


# --- device memory --------------------------------------------------------------------------------------------------
def test_staging_is_reserved_at_its_worst_case_when_the_layer_is_built(monkeypatch, calls):
    """vllm-ascend builds the model before its profile run: PFA's packed query and K/V buffers, reserved then at
    their worst case (a step's tokens of queries, max_model_len of keys and values), are in the memory that run
    measures; every call stays within them."""
    case = Case(BATCHES["mixed"], max_num_batched_tokens=1024)
    monkeypatch.setattr(ascend_attn, "_staging_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(STAGING, "_buffers", {})
    config = vllm_config(case)
    make_impl(case, config)
    itemsize = case.dtype.itemsize
    query_bytes = 1024 * case.num_heads * case.head_size * itemsize
    kv_bytes = 2 * config.model_config.max_model_len * case.num_kv_heads * case.head_size * itemsize
    assert STAGING.reserved_bytes() == query_bytes + kv_bytes
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    assert STAGING.reserved_bytes() == query_bytes + kv_bytes  # nothing grew


def test_requests_beyond_the_call_budget_get_calls_of_their_own(monkeypatch, calls):
    """A step's padded batch is bounded: with 256 tokens of query budget the prefills split into calls."""
    case = Case([(1, 200), (200, 200), (130, 400), (100, 100)], max_num_batched_tokens=512)
    output, expected, metadata = run(case, monkeypatch)
    assert_close(case, output, expected)
    shapes = [(c.num_requests, c.max_query_len) for c in metadata.pfa_prefill.calls]
    assert all(b * q <= 512 for b, q in shapes) and len(shapes) > 1
    check_pfa_arguments(case, calls)


def test_sliding_window_layers_gather_only_their_window(monkeypatch, calls):
    case = Case(BATCHES["prefills_with_context"], sliding_window=64)
    output, expected, metadata = run(case, monkeypatch)
    assert_close(case, output, expected)
    (call,) = metadata.pfa_prefill.calls
    assert call.kv_lens == [min(s, q + 63) for q, s in case.requests]
    check_pfa_arguments(case, calls)


# --- KV transfer window ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["mixed", "fresh_prefills"])
def test_pfa_runs_inside_vllm_ascends_transfer_window(monkeypatch, calls, batch):
    """A layer-wise KV store opens a gate before attention is submitted and runs its completion policy after:
    the decode rows and PFA both inside, the policy once per layer, after PFA."""
    events = []
    gate = attention_fence.reset_attention_compute_start_gate()
    gate.on_finish = lambda: events.append(("finish", len(torch_npu.CALLS)))
    monkeypatch.setattr(gate, "record", lambda *args: events.append(("start", len(torch_npu.CALLS))))
    try:
        case = Case(BATCHES[batch])
        output, expected, _ = run(case, monkeypatch)
    finally:
        with attention_fence._lock:
            attention_fence._attention_compute_start_gate = None
    assert_close(case, output, expected)
    check_decode_path(case, calls)
    pfa_positions = [i for i, c in enumerate(calls) if c.name == "npu_prompt_flash_attention"]
    finishes = [n for kind, n in events if kind == "finish"]
    assert len(finishes) == 1 and finishes[0] > max(pfa_positions)
    assert min(n for kind, n in events if kind == "start") <= min(pfa_positions)

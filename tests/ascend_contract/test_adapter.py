"""The PFA Ascend adapter (vllm_pfa.backend.ascend_attn) on vllm-ascend's real builder, metadata and impl.

Batches are built as vllm-ascend's V1 model runner hands them to its builder, every field exact
(AscendCommonAttentionMetadata; the runners' own metadata code, padding included, drives test_runners.py), K/V in
the layouts vllm-ascend's runners allocate (harness.KV_LAYOUTS). Outputs are compared with an independent fp64
reference computed from the raw per-request q/k/v; the torch_npu stand-in's recorded calls show which rows took which
path, and with which PFA arguments.
"""

import itertools

import pytest
import torch
from vllm.config import CompilationConfig, set_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.kv_cache_interface import FullAttentionSpec

from harness import (
    BATCHES,
    KERNEL_BLOCK,
    KV_LAYOUTS,
    SPECULATIVE_BATCHES,
    SPECULATIVE_TOKENS,
    Case,
    assert_close,
    check_decode_path,
    check_pfa_arguments,
    pfa_calls,
    run,
    single_rank_groups,  # noqa: F401  (module fixture)
    vllm_config,
)
from vllm_pfa.backend.ascend_attn import PFAAscendAttentionBackend, PFAAscendMetadata, PFAAscendMetadataBuilder

pytestmark = pytest.mark.usefixtures("single_rank_groups")


@pytest.mark.parametrize("layout", KV_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_batches_match_reference_with_decode_on_vllm_ascend_and_prefill_on_pfa(monkeypatch, calls, batch, dtype,
                                                                                layout):
    case = Case(BATCHES[batch], dtype=dtype, kv_layout=layout)
    output, expected, metadata = run(case, monkeypatch)
    assert isinstance(metadata, PFAAscendMetadata)
    assert_close(case, output, expected)
    check_decode_path(case, calls)
    if batch == "decode_only":
        assert metadata.pfa_prefill is None and not pfa_calls(calls)
    else:
        check_pfa_arguments(case, calls)
    assert not any(c.name == "npu_fusion_attention" for c in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", list(SPECULATIVE_BATCHES))
def test_speculative_verification_rows_stay_on_vllm_ascend(monkeypatch, calls, batch, dtype):
    """Under a speculative config vllm-ascend's builder counts rows of up to 1 + k query tokens as decodes: they stay
    on its path (FIA in TND, not paged attention, as vllm-ascend does with a speculative config), with the per-row
    lengths vllm-ascend uses (cumulative query ends, per-request kv lengths); PFA gets the real prefills only."""
    case = Case(SPECULATIVE_BATCHES[batch], dtype=dtype, speculative_tokens=SPECULATIVE_TOKENS)
    output, expected, metadata = run(case, monkeypatch)
    assert_close(case, output, expected)
    assert not [c for c in calls if c.name == "_npu_paged_attention"]
    (fia,) = [c for c in calls if c.name == "npu_fused_infer_attention_score"]
    assert fia.kwargs["paged"] and fia.kwargs["sparse_mode"] == 3
    assert fia.kwargs["query_lens"] == list(itertools.accumulate(q for q, _ in case.decode_requests))
    assert fia.kwargs["kv_lens"] == [s for _, s in case.decode_requests]
    if batch == "verification_only":
        assert metadata.pfa_prefill is None and not pfa_calls(calls)
    else:
        check_pfa_arguments(case, calls)


def test_graph_capture_is_declared_truthfully():
    """vllm-ascend's builder answers ALWAYS (a mixed prefill batch may be captured in a full graph, freezing PFA's
    host-side plan); PFA's answers UNIFORM_BATCH, and vLLM's own resolution of a FULL request then keeps full graphs
    for uniform decode batches only, mixed batches running without one."""
    case = Case(BATCHES["mixed"])
    config = vllm_config(case)
    spec = FullAttentionSpec(block_size=KERNEL_BLOCK, num_kv_heads=case.num_kv_heads, head_size=case.head_size,
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
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    check_decode_path(case, calls)
    check_pfa_arguments(case, calls)
    assert not [c for c in calls if c.name == "npu_scatter_pa_kv_cache"]


@pytest.mark.parametrize("heads,kv_heads,head_size,rule", [
    (512, 8, 64, "num_heads"), (128, 1, 128, "cannot be larger than 64"), (4, 2, 576, "d should <= 512"),
    (256, 256, 256, r"N\*D"),
])
def test_layers_outside_the_spec_are_refused_when_built(heads, kv_heads, head_size, rule):
    """On an NPU the operator hands its arguments to torch_npu unchecked: the spec's limits on the per-rank heads
    are checked when the layer is built, at start-up, instead of surfacing as a kernel error on the first prefill."""
    with set_current_vllm_config(vllm_config(Case(BATCHES["mixed"]))), \
            pytest.raises(ValueError, match=f"cannot run this model's attention layers.*{rule}"):
        PFAAscendAttentionBackend.get_impl_cls()(
            num_heads=heads, head_size=head_size, scale=0.1, num_kv_heads=kv_heads, alibi_slopes=None,
            sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None, attn_type="decoder",
            kv_sharing_target_layer_name=None)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 1), (6, 2)], ids=["mha", "mqa", "gqa3"])
def test_head_groupings(monkeypatch, calls, num_heads, num_kv_heads):
    case = Case(BATCHES["mixed"], num_heads=num_heads, num_kv_heads=num_kv_heads)
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    check_pfa_arguments(case, calls)


def test_sliding_window_prefill_is_pfa_band_mode(monkeypatch, calls):
    case = Case(BATCHES["prefills_with_context"], sliding_window=64)
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    check_pfa_arguments(case, calls)


@pytest.mark.parametrize("batch", ["prefills_with_context", "mixed"])
def test_spec_block_size_larger_than_kernel_block(monkeypatch, calls, batch):
    """Hybrid / multi-group models: spec blocks of 256 tokens over vllm-ascend's 128-token kernel blocks."""
    case = Case(BATCHES[batch], spec_block_size=2 * KERNEL_BLOCK)
    output, expected, _ = run(case, monkeypatch)
    assert_close(case, output, expected)
    check_pfa_arguments(case, calls)


def test_npu_branch_gives_the_cpu_implementations_results(monkeypatch, calls):
    """The operator's NPU branch (forced) reaches torch_npu.npu_prompt_flash_attention, with the same results as the
    CPU implementation called directly."""
    case = Case(BATCHES["mixed"])
    direct, _, _ = run(case, force_npu_branch=False)
    assert not pfa_calls(calls)
    through_npu, _, _ = run(case, monkeypatch)
    assert pfa_calls(calls)
    torch.testing.assert_close(through_npu, direct, atol=0, rtol=0)

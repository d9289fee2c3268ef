"""The adapter fed by the metadata vllm-ascend's own model runners build, V1 and V2, padding and all.

V2 (`worker/v2`, the runner vLLM 0.30 picks where Triton imports): `attn_utils.build_attn_metadata` itself, with
inputs shaped as `NPUModelRunner.prepare_inputs` / `DefaultModelState.prepare_attn` shape them: host lengths from
`seq_lens_np` (or only the upper bound, as vLLM's speculator builds its draft metadata, or neither: vllm-ascend then
fills `max_seq_len`), the device `seq_lens` exact, FULL-graph padding from the runner's own
`_pad_query_start_loc_for_fia` (a dummy request holding the padded tokens), token counts padded to a capture size.
V1 (`worker/model_runner_v1`): its own `_pad_query_start_loc_for_fia` (sequence-parallel padding's dummy request),
its async speculative-decoding correction `correct_optimistic_seq_lens_cpu`, and `AscendCommonAttentionMetadata`
wired field for field as its `_build_attention_metadata` wires it (that method needs a whole runner).

Every batch: outputs of the real rows against the independent reference, padded rows left alone by PFA, and PFA's
recorded `actual_seq_lengths(_kv)` equal to the true lengths, whatever the host copies said.
"""

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.config import CUDAGraphMode, set_current_vllm_config
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm_ascend.attention.attention_v1 import AscendAttentionState
from vllm_ascend.attention.utils import AscendCommonAttentionMetadata
from vllm_ascend.spec_decode.utils import correct_optimistic_seq_lens_cpu
from vllm_ascend.worker.v2.attn_utils import build_attn_metadata

from harness import (
    BATCHES,
    LAYER_NAME,
    MAX_MODEL_LEN,
    SPECULATIVE_BATCHES,
    SPECULATIVE_TOKENS,
    Batch,
    Case,
    assert_close,
    attn_state,
    check_decode_path,
    check_pfa_arguments,
    forward,
    kv_cache_spec,
    make_batch,
    make_builder,
    make_impl,
    pfa_calls,
    reference,
    single_rank_groups,  # noqa: F401  (module fixture)
    vllm_config,
)
from vllm_pfa.ops import api

pytestmark = pytest.mark.usefixtures("single_rank_groups")


def _v2_pad_query_start_loc_for_fia():
    """The V2 runner's `NPUModelRunner._pad_query_start_loc_for_fia`. Its module does not import on vLLM 0.32 (it needs
    0.30's `vllm.v1.worker.gpu` API); there the method's own source is compiled from vllm-ascend's file (it uses only
    numpy and CUDAGraphMode), so both stacks run vllm-ascend's code."""
    try:
        from vllm_ascend.worker.v2.model_runner import NPUModelRunner

        return NPUModelRunner._pad_query_start_loc_for_fia
    except ImportError:
        import vllm_ascend.worker.v2 as v2_package

        source = Path(v2_package.__file__).with_name("model_runner.py").read_text()
        (method,) = [node for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.FunctionDef) and node.name == "_pad_query_start_loc_for_fia"]
        namespace = {"np": np, "CUDAGraphMode": CUDAGraphMode}
        exec(compile(ast.Module(body=[method], type_ignores=[]), "vllm_ascend/worker/v2/model_runner.py", "exec"),
             namespace)
        return namespace["_pad_query_start_loc_for_fia"]


@pytest.fixture(autouse=True)
def npu_branch(monkeypatch):
    monkeypatch.setattr(api, "runs_on_npu", lambda tensor: True)  # PFA calls reach the stand-in (recorded)


def _check(case: Case, batch: Batch, metadata, output: torch.Tensor, calls, *, decode_rows: bool = True) -> None:
    """`decode_rows=False`: only the prefill rows are compared (vllm-ascend's decode path reads the host lengths
    it is given, which some batches here overstate on purpose). Padding rows: with a PFA plan nothing writes them
    (without one, the whole batch is vllm-ascend's, padding included)."""
    real, first = batch.num_tokens, sum(q for q, _ in case.decode_requests)
    checked = slice(0 if decode_rows else first, real)
    assert_close(case, output[checked], reference(case, batch)[checked])
    if metadata.pfa_prefill is not None:
        assert output[real:].isnan().all(), "padding rows must be left alone"
        check_decode_path(case, calls)
        check_pfa_arguments(case, calls)
    else:  # no real prefill: vllm-ascend's own path ran the whole step, as it would without PFA
        assert not case.prefill_requests and not pfa_calls(calls)
        assert [c for c in calls if c.name in ("npu_fused_infer_attention_score", "_npu_paged_attention")]


# --- V2: vllm_ascend/worker/v2 -------------------------------------------------------------------------------------
def _v2_metadata(case: Case, batch: Batch, builder, *, host_lengths: str, graph: str = "none",
                 capture_tokens: int | None = None):
    """`build_attn_metadata` as `DefaultModelState.prepare_attn` calls it for this batch.

    host_lengths: "exact" (`seq_lens_np` as `_update_seq_lens_cpu` keeps it), "upper_bound" (only
    `seq_lens_cpu_upper_bound`, every request's length overstated by the speculative tokens, as for draft
    metadata), "none" (neither: vllm-ascend fills `max_seq_len`). graph: "none" (eager: actual counts),
    "full" (FULL-graph padding to `capture_tokens` through the runner's own `_pad_query_start_loc_for_fia`).
    Returns (metadata of the layer, num_input_tokens)."""
    num_reqs, num_tokens = len(case.requests), batch.num_tokens
    max_num_reqs = num_reqs + 4
    query_start_loc_np = np.empty(max_num_reqs + 2, dtype=np.int32)
    query_start_loc_np[: num_reqs + 1] = batch.query_start_loc.numpy()
    query_start_loc_np[num_reqs + 1:] = num_tokens
    num_reqs_padded, num_input_tokens = num_reqs, num_tokens
    if graph == "full":
        fake_self = SimpleNamespace(decode_query_len=1 + case.speculative_tokens,
                                    compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL))
        num_input_tokens = capture_tokens
        query_start_loc_np, num_reqs_padded = _v2_pad_query_start_loc_for_fia()(
            fake_self, num_input_tokens, num_reqs, num_reqs, query_start_loc_np, CUDAGraphMode.FULL, None, None)
    query_start_loc_np = query_start_loc_np[: num_reqs_padded + 1]
    seq_lens = torch.zeros(num_reqs_padded, dtype=torch.int32)  # the device buffer: exact, padding 0
    seq_lens[:num_reqs] = batch.seq_lens
    seq_lens_np = np.zeros(max_num_reqs, dtype=np.int32)  # input_buffers.seq_lens_np: padding 0
    seq_lens_np[:num_reqs] = batch.seq_lens.numpy()
    upper_bound = torch.zeros(num_reqs_padded, dtype=torch.int32)
    upper_bound[:num_reqs] = batch.seq_lens + case.speculative_tokens
    block_table = torch.zeros(num_reqs_padded, batch.block_table.shape[1], dtype=torch.int32)
    block_table[:num_reqs] = batch.block_table
    slot_mappings = torch.full((1, num_input_tokens), -1, dtype=torch.int64)
    slot_mappings[0, :num_tokens] = batch.slot_mapping
    group = SimpleNamespace(layer_names=[LAYER_NAME], get_metadata_builder=lambda ubatch_id=0: builder)
    kv_cache_config = KVCacheConfig(num_blocks=block_table.max().item() + 1, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec([LAYER_NAME], kv_cache_spec(case))])
    host = {"exact": dict(seq_lens_np=seq_lens_np), "upper_bound": dict(seq_lens_cpu_upper_bound=upper_bound),
            "none": {}}[host_lengths]
    query_start_loc = torch.from_numpy(query_start_loc_np.copy())
    metadata = build_attn_metadata(
        attn_groups=[[group]], num_reqs=num_reqs_padded, num_actual_reqs=num_reqs, num_tokens=num_input_tokens,
        num_actual_tokens=num_tokens, num_input_tokens=num_input_tokens, query_start_loc_gpu=query_start_loc,
        query_start_loc_cpu=torch.from_numpy(query_start_loc_np), max_query_len=max(q for q, _ in case.requests),
        seq_lens=seq_lens, max_seq_len=MAX_MODEL_LEN, block_tables=[block_table], slot_mappings=slot_mappings,
        kv_cache_config=kv_cache_config, attn_state=attn_state(case),
        is_prefilling=torch.tensor([q > 1 + case.speculative_tokens for q, _ in case.requests]),
        positions=torch.zeros(num_input_tokens, dtype=torch.int64),
        full_graph_mode=graph == "full", **host)
    return metadata[LAYER_NAME], num_input_tokens


def _run_v2(case: Case, calls, decode_rows: bool = True, **kwargs):
    config = vllm_config(case)
    batch = make_batch(case)
    with set_current_vllm_config(config):
        metadata, num_input_tokens = _v2_metadata(case, batch, make_builder(case, config), **kwargs)
    output = forward(make_impl(case, config), metadata, batch, config, num_input_tokens)
    _check(case, batch, metadata, output, calls, decode_rows=decode_rows)
    return metadata


@pytest.mark.parametrize("batch", list(BATCHES))
def test_v2_eager_batches(calls, batch):
    _run_v2(Case(BATCHES[batch]), calls, host_lengths="exact")


@pytest.mark.parametrize("host_lengths,batch", [
    ("upper_bound", "mixed"), ("upper_bound", "prefills_with_context"), ("none", "prefills_with_context"),
    ("none", "fresh_prefills"),
])
def test_v2_host_lengths_that_are_not_exact(calls, batch, host_lengths):
    """Host lengths overstated (an upper bound, or max_seq_len for every request): vllm-ascend's decode path reads
    them (an upper bound still fits its decode rows' blocks here; max_seq_len does not, so those batches have no
    decodes); PFA gets the exact device lengths."""
    case = Case(BATCHES[batch], speculative_tokens=SPECULATIVE_TOKENS)
    metadata = _run_v2(case, calls, decode_rows=False, host_lengths=host_lengths)
    true_lengths = [s for _, s in case.requests]
    assert metadata.seq_lens_list[: len(true_lengths)] != true_lengths  # the host copies really were off


@pytest.mark.parametrize("batch", list(SPECULATIVE_BATCHES))
def test_v2_verification_rows_after_rejected_drafts(calls, batch):
    """Async scheduling with speculation: the upper bound assumes every draft was accepted; `seq_lens_np` holds the
    corrected lengths (`_update_seq_lens_cpu`); verification rows stay decodes, prefills get exact lengths."""
    case = Case(SPECULATIVE_BATCHES[batch], speculative_tokens=SPECULATIVE_TOKENS)
    _run_v2(case, calls, host_lengths="exact")


def test_v2_full_graph_mixed_batch_gets_a_dummy_request_pfa_never_sees(calls):
    """FULL graph mode pads a mixed batch's tokens to a capture size and adds a dummy request holding them (seq_len
    0, its query as long as the padding): not a prefill, never in a PFA plan; its rows keep their NaN."""
    case = Case(BATCHES["mixed"])
    metadata = _run_v2(case, calls, host_lengths="exact", graph="full", capture_tokens=320)
    assert len(metadata.actual_seq_lengths_q) == len(case.requests) + 1  # the runner did add the dummy request
    assert metadata.num_prefills == len(case.prefill_requests) + 1  # vllm-ascend counts it as a prefill


def test_v2_full_graph_uniform_decode_batch_padded_to_capture_size(calls):
    """A uniform decode batch padded to a captured request count: padding requests of one token, seq_len 0; all
    decodes, nothing for PFA."""
    case = Case(BATCHES["decode_only"])
    metadata = _run_v2(case, calls, host_lengths="exact", graph="full", capture_tokens=8)
    assert metadata.pfa_prefill is None


# --- V1: vllm_ascend/worker/model_runner_v1 -------------------------------------------------------------------------
class _CpuGpuBuffer:
    """The runner's query_start_loc buffer: a host array and its device copy (both host memory here)."""

    def __init__(self, size: int) -> None:
        self.np = np.zeros(size, dtype=np.int32)
        self.cpu = torch.from_numpy(self.np)
        self.gpu = torch.zeros(size, dtype=torch.int32)

    def copy_to_gpu(self, n: int | None = None) -> None:
        self.gpu.copy_(self.cpu)


def _v1_metadata(case: Case, batch: Batch, *, async_spec: bool, sp_padding: int = 0,
                 drafts_rejected: list[int] | None = None) -> tuple[AscendCommonAttentionMetadata, int]:
    """The common metadata as V1's `_build_attention_metadata` wires it. With `async_spec`, `optimistic_seq_lens_cpu`
    starts as the scheduler's optimistic lengths (every draft of the previous step accepted) and is corrected by
    vllm-ascend's `correct_optimistic_seq_lens_cpu` (the PFA backend is an AscendAttentionBackend, so the runner's
    `_needs_seq_lens_cpu_sync` holds); `seq_lens_cpu` and `num_computed_tokens_cpu` are then None. `sp_padding`
    tokens of sequence-parallel padding go to a dummy request through the runner's `_pad_query_start_loc_for_fia`."""
    from vllm_ascend.worker.model_runner_v1 import NPUModelRunner as runner
    num_reqs, num_tokens = len(case.requests), batch.num_tokens
    max_num_reqs = num_reqs + 4
    query_start_loc = _CpuGpuBuffer(max_num_reqs + 2)
    query_start_loc.np[: num_reqs + 1] = batch.query_start_loc.numpy()
    query_start_loc.np[num_reqs + 1:] = num_tokens
    num_reqs_padded, num_input_tokens = num_reqs, num_tokens + sp_padding
    if sp_padding:
        fake_self = SimpleNamespace(arange_np=np.arange(max_num_reqs + 2), uniform_decode_query_len=1,
                                    compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.PIECEWISE))
        num_reqs_padded = runner._pad_query_start_loc_for_fia(fake_self, query_start_loc, num_input_tokens,
                                                              num_reqs, num_reqs, CUDAGraphMode.NONE, None)
    optimistic = torch.zeros(max_num_reqs, dtype=torch.int32)
    optimistic[:num_reqs] = batch.seq_lens
    if async_spec:
        rejected = np.array(drafts_rejected, dtype=np.int32)
        optimistic[:num_reqs] += torch.from_numpy(rejected)  # the scheduler assumed every draft accepted
        prev_drafts = np.where(rejected > 0, case.speculative_tokens, 0).astype(np.int32)
        correct_optimistic_seq_lens_cpu(optimistic.numpy(), np.arange(num_reqs, dtype=np.int32), prev_drafts,
                                        (prev_drafts + 1 - rejected).astype(np.int32), num_reqs)
    seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32)  # self.seq_lens on the device: exact, padding 0
    seq_lens[:num_reqs] = batch.seq_lens
    block_table = torch.zeros(max_num_reqs, batch.block_table.shape[1], dtype=torch.int32)
    block_table[:num_reqs] = batch.block_table
    slot_mapping = torch.full((num_input_tokens,), -1, dtype=torch.int64)
    slot_mapping[:num_tokens] = batch.slot_mapping
    query_lens = torch.tensor([q for q, _ in case.requests], dtype=torch.int32)
    num_computed = torch.zeros(num_reqs_padded, dtype=torch.int32)
    num_computed[:num_reqs] = batch.seq_lens - query_lens
    common = AscendCommonAttentionMetadata(
        query_start_loc=query_start_loc.gpu[: num_reqs_padded + 1],
        query_start_loc_cpu=query_start_loc.cpu[: num_reqs_padded + 1],
        seq_lens=seq_lens[:num_reqs_padded], _seq_lens_cpu=optimistic[:num_reqs_padded],
        seq_lens_cpu_upper_bound=optimistic[:num_reqs_padded],
        seq_lens_cpu=None if async_spec else optimistic[:num_reqs_padded],
        num_computed_tokens_cpu=None if async_spec else num_computed,
        num_reqs=num_reqs_padded, num_actual_tokens=num_tokens, max_query_len=int(query_lens.max()),
        max_seq_len=int(optimistic[:num_reqs].max()), block_table_tensor=block_table[:num_reqs_padded],
        slot_mapping=slot_mapping, causal=True, num_input_tokens=num_input_tokens,
        is_prefilling=torch.tensor([q > 1 + case.speculative_tokens for q, _ in case.requests]
                                   + [False] * (num_reqs_padded - num_reqs)),
        actual_seq_lengths_q=[], positions=torch.zeros(num_input_tokens, dtype=torch.int64),
        attn_state=attn_state(case), decode_token_per_req=1 + case.speculative_tokens)
    return common, num_input_tokens


def _run_v1(case: Case, calls, **kwargs):
    config = vllm_config(case)
    batch = make_batch(case)
    common, num_input_tokens = _v1_metadata(case, batch, **kwargs)
    metadata = make_builder(case, config).build(0, common)
    output = forward(make_impl(case, config), metadata, batch, config, num_input_tokens)
    _check(case, batch, metadata, output, calls)
    return metadata


@pytest.mark.parametrize("batch", list(BATCHES))
def test_v1_synchronous_batches(calls, batch):
    _run_v1(Case(BATCHES[batch]), calls, async_spec=False)


@pytest.mark.parametrize("batch", list(SPECULATIVE_BATCHES))
def test_v1_async_speculative_decoding_after_rejections(calls, batch):
    """Rejected drafts: the optimistic host lengths are corrected by vllm-ascend's own function; verification rows
    stay on its path, PFA gets the prefills' exact lengths."""
    case = Case(SPECULATIVE_BATCHES[batch], speculative_tokens=SPECULATIVE_TOKENS)
    rejected = [3 if q <= 1 + SPECULATIVE_TOKENS else 0 for q, _ in case.requests]
    _run_v1(case, calls, async_spec=True, drafts_rejected=rejected)


@pytest.mark.parametrize("batch", ["mixed", "prefills_with_context", "decode_only"])
def test_v1_sequence_parallel_padding_dummy_request(calls, batch):
    """Sequence parallelism pads the tokens to a multiple of the TP size; the runner puts them in a dummy request
    (seq_len 0) that vllm-ascend may count as a prefill: PFA never sees it, its rows keep their NaN."""
    case = Case(BATCHES[batch])
    metadata = _run_v1(case, calls, async_spec=False, sp_padding=3)
    assert len(metadata.actual_seq_lengths_q) == len(case.requests) + 1  # the runner did add the dummy request

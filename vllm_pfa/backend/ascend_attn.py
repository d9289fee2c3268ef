"""The PFA backend on Ascend NPUs, built on vllm-ascend's attention backend.

Decode stays on vllm-ascend's path (`AscendAttentionBackendImpl.forward_impl` on the decode rows: paged attention or
FIA, as vllm-ascend decides); prefill rows go through `npu_prompt_flash_attention`, planned once per step by the
shared `prefill` module, with context K/V read from vllm-ascend's cache (`ascend_kv`). Bidirectional layers (pooling
models, which vllm-ascend sends to its encoder path) go through PFA too, every request as a prefill.

Written against vllm-ascend 0.30.0rc2's `vllm_ascend/attention/attention_v1.py` (the builder's `metadata_cls` and
`_build_backend_metadata` extension point, the impl's `forward_impl`, `_forward_encoder_attention`,
`key_cache`/`value_cache`). It imports vllm_ascend, so it is only imported where vllm-ascend is installed; on CPU the
contract suite (tests/ascend_contract) runs it against vllm-ascend's released source with a torch_npu stand-in.
"""

import functools
from dataclasses import dataclass, replace

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.kv_cache_interface import SlidingWindowSpec
from vllm_ascend.attention.attention_v1 import (
    AscendAttentionBackend,
    AscendAttentionBackendImpl,
    AscendAttentionMetadataBuilder,
    AscendAttentionState,
    AscendMetadata,
)
from vllm_ascend.attention.utils import using_paged_attention
from vllm_ascend.distributed.kv_transfer.kv_pool.ascend_store.attention_fence import attention_transfer_window

from vllm_pfa.backend import ascend_kv
from vllm_pfa.backend.ascend_kv import CallIndices
from vllm_pfa.backend.prefill import (
    PFAPrefillPlan,
    check_layer,
    consecutive_within_budget,
    leading_rows,
    mask_arguments,
    pfa_arguments,
    plan_prefill,
)
from vllm_pfa.backend.staging import STAGING
from vllm_pfa.backend.stats import STATS
from vllm_pfa.log import init_logger
from vllm_pfa.ops import npu_prompt_flash_attention

logger = init_logger(__name__)


@dataclass
class PFAAscendMetadata(AscendMetadata):
    pfa_prefill: PFAPrefillPlan | None = None
    pfa_indices: list[CallIndices] | None = None  # per call of pfa_prefill: device indices, built once per step
    pfa_decode: AscendMetadata | None = None  # the leading decode rows' metadata, when the step has prefills too


def call_budgets(vllm_config) -> dict[str, int]:
    """Tokens one PFA call may pad its batch to: a step's query tokens, and one request's longest sequence (a
    request never splits, so a call must hold at least that)."""
    return dict(max_query_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                max_kv_tokens=vllm_config.model_config.max_model_len)


def real_requests_end(query_start: list[int], first: int, num_reqs: int, num_actual_tokens: int) -> int:
    """The end of the real requests from `first` on: the runner appends padding requests (graph or sequence-parallel
    padding, FIA's dummy request) after them, with tokens past `num_actual_tokens` or none."""
    end = first
    while end < num_reqs and query_start[end] < query_start[end + 1] <= num_actual_tokens:
        end += 1
    return end


class PFAAscendMetadataBuilder(AscendAttentionMetadataBuilder):
    metadata_cls = PFAAscendMetadata

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """At most UNIFORM_BATCH: vllm-ascend answers ALWAYS, which would let vLLM capture mixed prefill batches in
        a full graph and freeze PFA's host-side plan (per-request lengths, packing) into it. Uniform batches are
        decode-only (1 or 1 + k query tokens per request), which keep vllm-ascend's full-graph decode."""
        inherited = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return min(inherited, AttentionCGSupport.UNIFORM_BATCH, key=lambda support: support.value)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pfa_window = self.kv_cache_spec.sliding_window if isinstance(self.kv_cache_spec, SlidingWindowSpec) \
            else None
        self.pfa_group = functools.partial(consecutive_within_budget, **call_budgets(self.vllm_config))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False, **kwargs) -> AscendMetadata:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if metadata.pfa_prefill is not None and metadata.pfa_prefill.token_start:
            metadata.pfa_decode = _decode_rows(metadata)  # once per step, not per layer
        return metadata

    def _build_backend_metadata(self, common_attn_metadata, *, block_table, query_lens, seq_lens, num_decodes,
                                num_prefills):
        extra = super()._build_backend_metadata(
            common_attn_metadata, block_table=block_table, query_lens=query_lens, seq_lens=seq_lens,
            num_decodes=num_decodes, num_prefills=num_prefills)
        cm = common_attn_metadata
        num_reqs = num_decodes + num_prefills
        # Bidirectional attention has no decode rows: every request attends to all of its tokens through PFA.
        first = num_decodes if cm.causal else 0
        query_start = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        end = real_requests_end(query_start, first, num_reqs, cm.num_actual_tokens)
        if end > first:
            # The runner's device lengths, not its host copies: those are optimistic upper bounds where the runner
            # has not corrected them (async speculative decoding, draft steps, vllm-ascend's `max_seq_len`
            # fallback in build_attn_metadata), while the device tensor is what vllm-ascend's own kernels read.
            # One small device-to-host copy per step that has prefills.
            exact = cm.seq_lens[first:end].tolist()
            for r, seq_len in enumerate(exact, start=first):
                if not query_start[r + 1] - query_start[r] <= seq_len:
                    raise ValueError(f"vllm-pfa: request {r} has {query_start[r + 1] - query_start[r]} new tokens "
                                     f"but a sequence length of {seq_len}")
            plan = plan_prefill(
                first=first, num_reqs=end, token_start=query_start[first], query_start=query_start,
                seq_lens_host=[0] * first + exact, device=self.device, group=self.pfa_group,
                sliding_window=self.pfa_window if cm.causal else None)
            extra["pfa_prefill"] = plan
            extra["pfa_indices"] = ascend_kv.build_call_indices(plan.calls, first, self.device)
        return extra


def _decode_rows(metadata: PFAAscendMetadata) -> AscendMetadata:
    """The metadata of the leading decode requests only, as vllm-ascend builds it for a decode-only step."""
    decodes, tokens = metadata.num_decodes, metadata.num_decode_tokens
    return replace(
        metadata, attn_state=AscendAttentionState.DecodeOnly, num_actual_tokens=tokens, num_prefills=0,
        seq_lens=metadata.seq_lens[:decodes], seq_lens_cpu=metadata.seq_lens_cpu[:decodes],
        seq_lens_list=metadata.seq_lens_list[:decodes], actual_seq_lengths_q=metadata.actual_seq_lengths_q[:decodes],
        query_start_loc=metadata.query_start_loc[: decodes + 1], max_query_len=max(1, tokens // max(decodes, 1)),
        block_tables=metadata.block_tables[:decodes], slot_mapping=metadata.slot_mapping[:tokens], pfa_prefill=None,
        pfa_indices=None,
    )


def _staging_device() -> torch.device | None:
    """The NPU the model is being built on; None without one (CPU runs allocate on first use)."""
    return torch.device("npu", torch.npu.current_device()) if torch.npu.is_available() else None


class PFAAscendAttentionImpl(AscendAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_layer(self.num_heads, self.num_kv_heads, self.head_size)  # per rank, before any NPU call
        # per causality of the step (CommonAttentionMetadata.causal), computed once per layer
        self.pfa_mask_args = {causal: mask_arguments(self.sliding_window, causal) for causal in (True, False)}
        self._pfa_geometry: tuple[torch.Tensor, ascend_kv.CacheGeometry | None] | None = None
        self._reserve_staging()

    def _reserve_staging(self) -> None:
        """The worst case of one call's packed query and gathered K/V, reserved now (see the staging module)."""
        device = _staging_device()
        if device is None:
            return
        budgets, dtype = call_budgets(self.vllm_config), self.vllm_config.model_config.dtype
        STAGING.reserve("query", budgets["max_query_tokens"] * self.num_heads * self.head_size, dtype, device)
        STAGING.reserve("key_value", 2 * budgets["max_kv_tokens"] * self.num_kv_heads * self.head_size, dtype,
                        device)
        logger.info_once("vllm-pfa: %.1f MiB of device memory reserved for PFA's packed prefill batches",
                         STAGING.reserved_bytes(device) / 2**20)

    def _geometry(self) -> ascend_kv.CacheGeometry | None:
        if self._pfa_geometry is None or self._pfa_geometry[0] is not self.key_cache:
            self._pfa_geometry = (self.key_cache, ascend_kv.cache_geometry(
                self.key_cache, self.value_cache, heads_major=self.use_bnsd_kv_cache))
        return self._pfa_geometry[1]

    def _forward_decodes(self, query, key, value, kv_cache, metadata: AscendMetadata, output) -> None:
        """vllm-ascend's `forward_impl` for a decode-only step, without its transfer window: the caller's window
        covers these rows and PFA's (a window of their own would close before PFA runs)."""
        if self.sliding_window is None and using_paged_attention(query.shape[0], self.vllm_config, self.head_size):
            self.forward_paged_attention(query, metadata, output)
        else:
            self.forward_fused_infer_attention(query, key, value, metadata, output, kv_cache)

    def _keys_values(self, key, value, call, indices: CallIndices, metadata: PFAAscendMetadata):
        """`[B, Skv, kv_heads, D]` keys and values of one call: the new rows themselves for fresh requests (views
        when B = 1), else every key read from the cache (written before attention runs, by this layer or, for a
        KV-sharing layer, by its target)."""
        shape = (indices.batch, indices.max_kv_len, self.num_kv_heads, self.head_size)
        if key is not None and not call.has_context:
            key, value = key[indices.query_rows], value[indices.query_rows]
            if indices.query_index is None:
                return key.contiguous().unsqueeze(0), value.contiguous().unsqueeze(0)
            staged = STAGING.view("key_value", key, 2, *shape)
            torch.index_select(key, 0, indices.query_index, out=staged[0].view(-1, *shape[2:]))
            torch.index_select(value, 0, indices.query_index, out=staged[1].view(-1, *shape[2:]))
            return staged[0], staged[1]
        block_table = metadata.block_tables
        geometry = self._geometry()
        staged = STAGING.view("key_value", self.key_cache, 2, indices.batch * indices.max_kv_len, *shape[2:])
        if geometry is None:
            ascend_kv.gather_by_index(self.key_cache, self.value_cache, indices, block_table,
                                      heads_major=self.use_bnsd_kv_cache, out=staged)
        else:
            rows = ascend_kv.key_value_rows(indices, geometry, block_table)
            ascend_kv.gather_keys_values(self.key_cache, self.value_cache, geometry, rows,
                                         staged.view(2, -1, geometry.row_elems))
        STATS.context_tokens += sum(call.kv_lens) - (0 if key is None else sum(call.query_lens))
        return staged[0].view(shape), staged[1].view(shape)

    def _run_pfa(self, query, key, value, metadata: PFAAscendMetadata, output) -> None:
        """The step's PFA calls: per call, the packed query (a view when B = 1), one gather of its K/V, PFA, and the
        rows written back into `output` (one index_select)."""
        plan = metadata.pfa_prefill
        rows = slice(plan.token_start, plan.token_start + plan.num_tokens)
        query, new_rows = query[rows], output[rows]
        if key is not None:  # None: a layer that shares another layer's K/V (read from the cache)
            key, value = key[rows], value[rows]
        for call, indices in zip(plan.calls, metadata.pfa_indices):
            call_query = query[indices.query_rows]
            if indices.query_index is None:
                packed = call_query.contiguous().unsqueeze(0)
            else:
                packed = STAGING.view("query", call_query, indices.batch, indices.max_query_len, *query.shape[1:])
                torch.index_select(call_query, 0, indices.query_index, out=packed.view(-1, *query.shape[1:]))
            keys, values = self._keys_values(key, value, call, indices, metadata)
            out = npu_prompt_flash_attention(
                packed, keys, values, **pfa_arguments(call, plan, num_heads=self.num_heads,
                                                      num_kv_heads=self.num_kv_heads, scale=self.scale,
                                                      mask_args=self.pfa_mask_args[metadata.causal]))
            target = new_rows[indices.query_rows]
            if indices.output_index is None:
                target.copy_(out.view(target.shape))
            else:
                torch.index_select(out.view(-1, *target.shape[1:]), 0, indices.output_index, out=target)
            STATS.prefill_calls += 1
        STATS.prefill_tokens += plan.num_tokens

    def forward_impl(self, query, key, value, kv_cache, attn_metadata, output):
        plan = getattr(attn_metadata, "pfa_prefill", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward_impl(query, key, value, kv_cache, attn_metadata, output)
        # vllm-ascend's transfer window (a layer-wise KV store waits on it) around all of this layer's attention
        with attention_transfer_window():
            split = plan.token_start
            if split:
                self._forward_decodes(query[:split], leading_rows(key, split), leading_rows(value, split),
                                      kv_cache, attn_metadata.pfa_decode, output[:split])
                STATS.decode_tokens += split
            self._run_pfa(query, key, value, attn_metadata, output)
        return output

    def _forward_encoder_attention(self, query, key, value, attn_metadata, output):
        """vllm-ascend's path for bidirectional layers of pooling models: PFA without a mask (band for a window)."""
        with attention_transfer_window():
            self._run_pfa(query, key, value, attn_metadata, output)
        return output


class PFAAscendAttentionBackend(AscendAttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        return "PFA"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # prefill: PFA's band mode 4; decode: vllm-ascend's own path

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type in (AttentionType.DECODER, AttentionType.ENCODER_ONLY)

    @staticmethod
    def get_impl_cls() -> type[PFAAscendAttentionImpl]:
        return PFAAscendAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PFAAscendMetadataBuilder]:
        return PFAAscendMetadataBuilder

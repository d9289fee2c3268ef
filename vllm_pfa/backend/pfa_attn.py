"""The PFA attention backend for vLLM on CPU: prefill through `npu_prompt_flash_attention`, decode through vLLM's
CPU attention kernel (the existing path), on vLLM's own CPU KV cache.

Roles as in vLLM's backends: `PFAAttentionBackend` (static facts), `PFAMetadata` (plain per-step data),
`PFAMetadataBuilder` (all per-step planning: decode/prefill split, PFA lengths, packing indices, context blocks),
`PFAAttentionImpl` (per-layer compute only).
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionLayer,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.utils import record_function_or_nullcontext

from vllm_pfa.backend.prefill import (
    PFAPrefillPlan,
    check_layer,
    leading_rows,
    mask_arguments,
    own_calls_then_rest,
    plan_prefill,
    run_prefill,
)
from vllm_pfa.backend.stats import STATS
from vllm_pfa.log import init_logger
from vllm_pfa.ops import cpu_kv_layout

logger = init_logger(__name__)


class PFAAttentionBackend(CPUAttentionBackend):
    """Same KV cache, block sizes and dtypes as vLLM's CPU backend. Decoder layers (causal or bidirectional) and
    encoder-only layers. Encoder-decoder models are refused at selection (their cross-attention reads the encoder's
    K/V from a cross-attention cache, which this backend does not plan)."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]  # the context gather reads unquantized K/V

    @staticmethod
    def get_name() -> str:
        return "PFA"

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True  # sparse_mode 0 without a mask, or band mode 4 with a window

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type in (AttentionType.DECODER, AttentionType.ENCODER_ONLY)

    @staticmethod
    def get_impl_cls() -> type["PFAAttentionImpl"]:
        return PFAAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["PFAMetadataBuilder"]:
        return PFAMetadataBuilder


@dataclass(kw_only=True)
class PFAMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata of the whole batch (the fields vLLM's generic code and backend tests read, e.g.
    `slot_mapping` for `impl.do_kv_cache_update`), plus how the batch is split between the two paths. The
    CPU kernel's scheduler plan is only built for the existing path's part (`existing_path.scheduler_metadata`)."""

    num_existing_path_tokens: int  # leading tokens (decodes) that go to the existing path
    existing_path: CPUAttentionMetadata | None
    prefill: PFAPrefillPlan | None


def _leading_requests(cm: CommonAttentionMetadata, num_reqs: int, num_tokens: int,
                      seq_lens_host: list[int]) -> CommonAttentionMetadata:
    """The common metadata of the first `num_reqs` requests only."""
    upper_bound = cm.seq_lens_cpu_upper_bound
    return replace(
        cm,
        query_start_loc=cm.query_start_loc[: num_reqs + 1],
        query_start_loc_cpu=cm.query_start_loc_cpu[: num_reqs + 1],
        seq_lens=cm.seq_lens[:num_reqs],
        seq_lens_cpu_upper_bound=None if upper_bound is None else upper_bound[:num_reqs],
        num_reqs=num_reqs,
        num_actual_tokens=num_tokens,
        max_query_len=int((cm.query_start_loc_cpu[1: num_reqs + 1] - cm.query_start_loc_cpu[:num_reqs]).max()),
        max_seq_len=max(seq_lens_host[:num_reqs]),
        block_table_tensor=cm.block_table_tensor[:num_reqs],
        slot_mapping=cm.slot_mapping[:num_tokens],
    )


# A prefill request with this many bytes of query rows gets a PFA call of its own (B = 1, no packing copy): copying
# them would take about as long as one call's fixed cost (~0.1 ms measured) at this machine's ~10 GB/s.
OWN_CALL_MIN_QUERY_BYTES = 1 << 20


class PFAMetadataBuilder(CPUAttentionMetadataBuilder):
    # CPU_ATTN's kernel runs any row, so vLLM may capture nothing of PFA's host-side plan in a graph (and on CPU
    # captures none): declared, not inherited, since the prefill plan depends on it.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first (the existing path gets a contiguous head of the batch, PFA the tail); a speculative
        # verification row (1 + k query tokens) is a decode, on CPU_ATTN's kernel, as in vLLM's own builders.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        query_row_bytes = self.num_heads * self.head_dim * self.dtype.itemsize
        self.own_call_min_tokens = -(-OWN_CALL_MIN_QUERY_BYTES // query_row_bytes)
        self.cache_layout = cpu_kv_layout.probe(self.isa, self.dtype, self.block_size, self.head_dim)
        # Layers that share another layer's K/V (vLLM puts them in their target's group) read every prefill token
        # back from the cache.
        self.has_kv_sharing_layers = any(
            layer.kv_sharing_target_layer_name is not None
            for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values())
        if self.cache_layout is None:
            logger.warning_once(
                "PFA: the CPU KV cache layout of ISA %r is not one the context gather reads; prefills with cached "
                "context (chunked prefill, prefix-cache hits) will use the existing CPU attention path.", self.isa)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PFAMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor):  # only vLLM's GPU model runner v2 sets it (DiffusionGemma)
            raise NotImplementedError("The PFA attention backend does not support per-request causality "
                                      "(CommonAttentionMetadata.causal as a tensor).")
        if self.is_encoder_only_attention:  # no KV cache: every request is a fresh prefill, one-token inputs too
            num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = 0, cm.num_reqs, 0, cm.num_actual_tokens
        else:
            num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(
                cm, decode_threshold=self.reorder_batch_threshold)
        prefill = None
        if num_prefills:
            query_start = cm.query_start_loc_cpu.tolist()
            # Host copies only: on CPU seq_lens is host memory; elsewhere vLLM's host upper bound is exact for
            # prefills.
            seq_lens_host = (cm.seq_lens if cm.seq_lens.device.type == "cpu" else cm.seq_lens_cpu_upper_bound).tolist()
            prefill = plan_prefill(
                first=num_decodes, num_reqs=cm.num_reqs, token_start=num_decode_tokens, query_start=query_start,
                seq_lens_host=seq_lens_host, device=self.device, block_table=cm.block_table_tensor,
                block_size=self.block_size, gather=None if self.cache_layout is None else self.cache_layout.gather,
                group=lambda query_lens, _: own_calls_then_rest(query_lens, self.own_call_min_tokens))
            if prefill.has_context and self.is_encoder_only_attention:
                raise ValueError("encoder-only attention has no KV cache to read context from")
            if self.cache_layout is None and (prefill.has_context or self.has_kv_sharing_layers):
                STATS.existing_path_prefill_tokens += num_prefill_tokens
                num_decodes, num_decode_tokens, prefill = cm.num_reqs, cm.num_actual_tokens, None
        existing_path = None
        if num_decodes:  # the whole batch (decodes only, or prefills rerouted above) as it is, else its leading part
            leading = cm if num_decodes == cm.num_reqs else _leading_requests(cm, num_decodes, num_decode_tokens,
                                                                              seq_lens_host)
            existing_path = super().build(common_prefix_len, leading, fast_build)
        STATS.log_step(num_decode_tokens, 0 if prefill is None else prefill.num_tokens)
        return PFAMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len, query_start_loc=cm.query_start_loc,
            max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens, block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping, scheduler_metadata=None, causal=cm.causal,
            num_existing_path_tokens=num_decode_tokens, existing_path=existing_path, prefill=prefill)


class PFAAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        # PFA has no ALiBi, soft-capping or sink inputs: refuse rather than compute something else.
        if alibi_slopes is not None:
            raise NotImplementedError("The PFA attention backend does not support ALiBi slopes.")
        if logits_soft_cap:
            raise NotImplementedError("The PFA attention backend does not support logits soft-capping.")
        if sinks is not None:
            raise NotImplementedError("The PFA attention backend does not support attention sinks.")
        check_layer(num_heads, num_kv_heads, head_size)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # per causality of the step (CommonAttentionMetadata.causal), computed once per layer
        self.pfa_mask_args = {causal: mask_arguments(self.sliding_window, causal) for causal in (True, False)}

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: PFAMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the PFA attention backend")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        split = attn_metadata.num_existing_path_tokens
        if attn_metadata.prefill is None:  # the whole step on CPU_ATTN: its forward as it is, nothing around it
            STATS.decode_tokens += split
            return super().forward(layer, query, key, value, kv_cache, attn_metadata.existing_path, output)
        if attn_metadata.existing_path is not None:
            # CPU_ATTN's decoder path reads K/V from the cache
            with record_function_or_nullcontext("pfa_backend.existing_path"):
                super().forward(layer, query[:split], leading_rows(key, split), leading_rows(value, split),
                                kv_cache, attn_metadata.existing_path, output[:split])
            STATS.decode_tokens += split
        if attn_metadata.prefill is not None:
            run_prefill(query, key, value, kv_cache, attn_metadata.prefill, output, num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads, head_size=self.head_size, scale=self.scale,
                        mask_args=self.pfa_mask_args[attn_metadata.causal])
        return output

"""The PFA attention backend for vLLM on CPU: prefill through `npu_prompt_flash_attention`, decode through vLLM's
CPU attention kernel (the existing path), on vLLM's own CPU KV cache.

Roles as in vLLM's backends: `PFAAttentionBackend` (static facts), `PFAMetadata` (plain per-step data),
`PFAMetadataBuilder` (all per-step planning: decode/prefill split, PFA lengths, packing indices, context blocks),
`PFAAttentionImpl` (per-layer compute only).
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm_pfa.log import init_logger
from vllm.v1.attention.backend import AttentionLayer, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_pfa.ops import cpu_kv_layout
from vllm_pfa.backend.stats import STATS
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention

logger = init_logger(__name__)

# PFA's layout for vLLM's token-major [tokens, heads, head_size] tensors: with one prefill request BSND is a
# zero-copy view (B = 1); BNSD would need a transpose copy of q, k and v, and BSH is BSND with the last two axes
# merged (no cheaper). Several requests are padded to the longest one.
PFA_LAYOUT = "BSND"
CAUSAL_SPARSE_MODE = 3  # rightDownCausal: new rows sit at the end of each request's kv sequence
BAND_SPARSE_MODE = 4  # sliding window: the band measured from the bottom-right corner


class PFAAttentionBackend(CPUAttentionBackend):
    """Same KV cache, block sizes and dtypes as vLLM's CPU backend; decoder attention only."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]  # the context gather reads unquantized K/V

    @staticmethod
    def get_name() -> str:
        return "PFA"

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["PFAAttentionImpl"]:
        return PFAAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["PFAMetadataBuilder"]:
        return PFAMetadataBuilder


@dataclass
class PFAPrefillPlan:
    """Everything the PFA call of one step needs, shared by all layers."""

    token_start: int  # first prefill token in the batch (decodes come first)
    num_tokens: int
    query_lens: list[int]  # actual_seq_lengths
    seq_lens: list[int]  # actual_seq_lengths_kv: context + new tokens
    query_starts: list[int]  # per request, relative to token_start
    context_block_ids: list[torch.Tensor | None]  # per request: blocks to gather, None for a fresh prefill
    max_query_len: int
    max_seq_len: int
    atten_mask: torch.Tensor  # the cached compressed causal mask
    cache_layout: cpu_kv_layout.CpuKVLayout | None  # how this group's cache stores K/V (None: unrecognized)
    packed_rows: torch.Tensor | None  # row of each new token in the padded [B * max_query_len] layout; None if B == 1

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def has_context(self) -> bool:
        return any(ids is not None for ids in self.context_block_ids)


@dataclass
class PFAMetadata:
    num_actual_tokens: int
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


class PFAMetadataBuilder(CPUAttentionMetadataBuilder):
    # Decodes first: then the existing path gets a contiguous head of the batch and PFA the tail.
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cache_layout = cpu_kv_layout.probe(self.isa, self.dtype, self.block_size, self.head_dim)
        if self.cache_layout is None:
            logger.warning_once(
                "PFA: the CPU KV cache layout of ISA %r is not one the context gather reads; prefills with cached "
                "context (chunked prefill, prefix-cache hits) will use the existing CPU attention path.", self.isa)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PFAMetadata:
        cm = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(
            cm, decode_threshold=self.reorder_batch_threshold)
        query_start = cm.query_start_loc_cpu.tolist()
        # Host copies only: on CPU seq_lens is host memory; elsewhere vLLM's host upper bound is exact for prefills.
        seq_lens_host = (cm.seq_lens if cm.seq_lens.device.type == "cpu" else cm.seq_lens_cpu_upper_bound).tolist()
        has_context = any(
            seq_lens_host[r] > query_start[r + 1] - query_start[r] for r in range(num_decodes, cm.num_reqs))
        if num_prefills and has_context and self.cache_layout is None:
            STATS.existing_path_prefill_tokens += num_prefill_tokens
            num_decodes, num_decode_tokens, num_prefills = cm.num_reqs, cm.num_actual_tokens, 0
        existing_path = None
        if num_decodes:
            existing_path = super().build(
                common_prefix_len, _leading_requests(cm, num_decodes, num_decode_tokens, seq_lens_host), fast_build)
        prefill = None
        if num_prefills:
            prefill = self._plan_prefill(cm, num_decodes, num_decode_tokens, query_start, seq_lens_host)
        STATS.log_step(num_decode_tokens, 0 if prefill is None else prefill.num_tokens)
        return PFAMetadata(num_actual_tokens=cm.num_actual_tokens, num_existing_path_tokens=num_decode_tokens,
                           existing_path=existing_path, prefill=prefill)

    def _plan_prefill(self, cm: CommonAttentionMetadata, first: int, token_start: int, query_start: list[int],
                      seq_lens_host: list[int]) -> PFAPrefillPlan:
        requests = range(first, cm.num_reqs)
        query_lens = [query_start[r + 1] - query_start[r] for r in requests]
        seq_lens = [seq_lens_host[r] for r in requests]
        context_block_ids = [
            cm.block_table_tensor[r, : -(-seq_lens_host[r] // self.block_size)].to(torch.long)
            if seq_lens_host[r] > query_start[r + 1] - query_start[r] else None
            for r in requests
        ]
        max_query_len = max(query_lens)
        packed_rows = None
        if len(query_lens) > 1:
            packed_rows = torch.cat([
                torch.arange(n) + i * max_query_len for i, n in enumerate(query_lens)])
        return PFAPrefillPlan(
            token_start=token_start, num_tokens=sum(query_lens), query_lens=query_lens, seq_lens=seq_lens,
            query_starts=[query_start[r] - token_start for r in requests], context_block_ids=context_block_ids,
            max_query_len=max_query_len, max_seq_len=max(seq_lens),
            atten_mask=compressed_causal_mask(self.device), cache_layout=self.cache_layout, packed_rows=packed_rows,
        )


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
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # A window of W keys (vLLM: j > i - W) is PFA's band with pre_tokens = W - 1, next_tokens = 0.
        self.pfa_mask_args = (
            dict(sparse_mode=CAUSAL_SPARSE_MODE) if self.sliding_window < 0
            else dict(sparse_mode=BAND_SPARSE_MODE, pre_tokens=self.sliding_window - 1, next_tokens=0)
        )

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: PFAMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the PFA attention backend")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        split = attn_metadata.num_existing_path_tokens
        if attn_metadata.existing_path is not None:
            super().forward(layer, query[:split], key[:split], value[:split], kv_cache,
                            attn_metadata.existing_path, output[:split])
            STATS.decode_tokens += split
        if attn_metadata.prefill is not None:
            self._prefill(query, key, value, kv_cache, attn_metadata.prefill, output)
        return output

    def _pack(self, tokens: torch.Tensor, plan: PFAPrefillPlan) -> torch.Tensor:
        """[T, heads, D] new tokens -> [B, max_query_len, heads, D] (BSND), padded on the right."""
        if plan.packed_rows is None:
            return tokens.contiguous().unsqueeze(0)
        packed = tokens.new_zeros(plan.num_requests * plan.max_query_len, *tokens.shape[1:])
        packed[plan.packed_rows] = tokens
        return packed.view(plan.num_requests, plan.max_query_len, *tokens.shape[1:])

    def _key_values(self, key, value, kv_cache, plan: PFAPrefillPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_seq_len, kv_heads, D] keys and values: new tokens, or context + new gathered from the cache."""
        if not plan.has_context:
            return self._pack(key, plan), self._pack(value, plan)
        layout = plan.cache_layout
        keys = key.new_zeros(plan.num_requests, plan.max_seq_len, *key.shape[1:])
        values = torch.zeros_like(keys)
        for i, (start, n, seq_len, block_ids) in enumerate(
                zip(plan.query_starts, plan.query_lens, plan.seq_lens, plan.context_block_ids)):
            if block_ids is None:
                keys[i, :n], values[i, :n] = key[start:start + n], value[start:start + n]
            else:
                keys[i, :seq_len], values[i, :seq_len] = layout.gather(kv_cache, block_ids, seq_len)
                STATS.context_tokens += seq_len - n
        return keys, values

    def _prefill(self, query, key, value, kv_cache, plan: PFAPrefillPlan, output) -> None:
        rows = slice(plan.token_start, plan.token_start + plan.num_tokens)
        keys, values = self._key_values(key[rows], value[rows], kv_cache, plan)
        out = npu_prompt_flash_attention(
            self._pack(query[rows], plan), keys, values, num_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, scale_value=self.scale, input_layout=PFA_LAYOUT,
            atten_mask=plan.atten_mask, actual_seq_lengths=plan.query_lens, actual_seq_lengths_kv=plan.seq_lens,
            **self.pfa_mask_args,
        )
        out = out.view(-1, self.num_heads, self.head_size)
        output[rows] = out if plan.packed_rows is None else out[plan.packed_rows]
        STATS.prefill_calls += 1
        STATS.prefill_tokens += plan.num_tokens

"""The PFA backend on Ascend NPUs, built on vllm-ascend's attention backend.

Decode stays on vllm-ascend's path (`AscendAttentionBackendImpl.forward_impl` on the decode rows: paged attention or
FIA, as vllm-ascend decides); prefill rows go through one `npu_prompt_flash_attention` call per layer, planned once
per step by the shared `prefill` module, with context K/V read from vllm-ascend's cache layout (`ascend_kv`).

Written against vllm-ascend's `vllm_ascend/attention/attention_v1.py` (the builder's `metadata_cls` and
`_build_backend_metadata` extension point, the impl's `forward_impl`, `key_cache`/`value_cache`). This module imports
vllm_ascend and torch_npu, so it is only imported where they are installed (never on the CPU machines this project
is tested on: its platform-independent parts, `prefill` and `ascend_kv`, are tested there).
"""

from dataclasses import dataclass, replace

import torch
from vllm.v1.attention.backend import AttentionType
from vllm_ascend.attention.attention_v1 import (
    AscendAttentionBackend,
    AscendAttentionBackendImpl,
    AscendAttentionMetadataBuilder,
    AscendAttentionState,
    AscendMetadata,
)

from vllm_pfa.backend import ascend_kv
from vllm_pfa.backend.prefill import PFAPrefillPlan, mask_arguments, plan_prefill, run_prefill
from vllm_pfa.backend.stats import STATS


@dataclass
class PFAAscendMetadata(AscendMetadata):
    pfa_prefill: PFAPrefillPlan | None = None


class PFAAscendMetadataBuilder(AscendAttentionMetadataBuilder):
    metadata_cls = PFAAscendMetadata

    def _build_backend_metadata(self, common_attn_metadata, *, block_table, query_lens, seq_lens, num_decodes,
                                num_prefills):
        extra = super()._build_backend_metadata(
            common_attn_metadata, block_table=block_table, query_lens=query_lens, seq_lens=seq_lens,
            num_decodes=num_decodes, num_prefills=num_prefills)
        if num_prefills:
            num_reqs = num_decodes + num_prefills
            query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
            extra["pfa_prefill"] = plan_prefill(
                first=num_decodes, num_reqs=num_reqs, token_start=query_start[num_decodes], query_start=query_start,
                seq_lens_host=seq_lens[:num_reqs].tolist(),  # vllm-ascend's host copy
                block_table=block_table, block_size=self.kv_cache_spec.block_size, device=self.device,
                gather=ascend_kv.gather)
        return extra


def _decode_rows(metadata: PFAAscendMetadata) -> PFAAscendMetadata:
    """The metadata of the leading decode requests only, as vllm-ascend builds it for a decode-only step."""
    decodes, tokens = metadata.num_decodes, metadata.num_decode_tokens
    return replace(
        metadata, attn_state=AscendAttentionState.DecodeOnly, num_actual_tokens=tokens, num_prefills=0,
        seq_lens=metadata.seq_lens[:decodes], seq_lens_cpu=metadata.seq_lens_cpu[:decodes],
        seq_lens_list=metadata.seq_lens_list[:decodes], actual_seq_lengths_q=metadata.actual_seq_lengths_q[:decodes],
        query_start_loc=metadata.query_start_loc[: decodes + 1], max_query_len=max(1, tokens // max(decodes, 1)),
        block_tables=metadata.block_tables[:decodes], slot_mapping=metadata.slot_mapping[:tokens], pfa_prefill=None,
    )


class PFAAscendAttentionImpl(AscendAttentionBackendImpl):
    def forward_impl(self, query, key, value, kv_cache, attn_metadata, output):
        plan = getattr(attn_metadata, "pfa_prefill", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward_impl(query, key, value, kv_cache, attn_metadata, output)
        split = attn_metadata.num_decode_tokens
        if split:
            super().forward_impl(query[:split], key[:split], value[:split], kv_cache, _decode_rows(attn_metadata),
                                 output[:split])
            STATS.decode_tokens += split
        run_prefill(query, key, value, (self.key_cache, self.value_cache), plan, output, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_size=self.head_size, scale=self.scale,
                    mask_args=mask_arguments(self.sliding_window))
        return output


class PFAAscendAttentionBackend(AscendAttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        return "PFA"

    @staticmethod
    def get_impl_cls() -> type[PFAAscendAttentionImpl]:
        return PFAAscendAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PFAAscendMetadataBuilder]:
        return PFAAscendMetadataBuilder

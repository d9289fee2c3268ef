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
import vllm.envs as envs
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm_ascend.attention.attention_v1 import (
    AscendAttentionBackend,
    AscendAttentionBackendImpl,
    AscendAttentionMetadataBuilder,
    AscendAttentionState,
    AscendMetadata,
)

from vllm_pfa.backend import ascend_kv
from vllm_pfa.backend.prefill import (
    PFAPrefillPlan,
    check_layer,
    leading_rows,
    mask_arguments,
    plan_prefill,
    run_prefill,
)
from vllm_pfa.backend.stats import STATS


@dataclass
class PFAAscendMetadata(AscendMetadata):
    pfa_prefill: PFAPrefillPlan | None = None


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
        # The cache layout is fixed for the process: pick the gather once, not per step.
        self.pfa_gather = functools.partial(ascend_kv.gather,
                                            heads_major=envs.VLLM_KV_CACHE_LAYOUT in ("LBHNC", "HND"))

    def _build_backend_metadata(self, common_attn_metadata, *, block_table, query_lens, seq_lens, num_decodes,
                                num_prefills):
        extra = super()._build_backend_metadata(
            common_attn_metadata, block_table=block_table, query_lens=query_lens, seq_lens=seq_lens,
            num_decodes=num_decodes, num_prefills=num_prefills)
        num_reqs = num_decodes + num_prefills
        # Bidirectional attention has no decode rows: every request attends to all of its tokens through PFA.
        first = num_decodes if common_attn_metadata.causal else 0
        if num_reqs > first:
            query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
            extra["pfa_prefill"] = plan_prefill(
                first=first, num_reqs=num_reqs, token_start=query_start[first], query_start=query_start,
                seq_lens_host=seq_lens[:num_reqs].tolist(),  # vllm-ascend's host copy
                # The block table is in the cache's kernel blocks, which may be smaller than the spec's blocks:
                # keep whole rows, and let the gather read the block size off the cache.
                block_table=block_table, block_size=None, device=self.device, gather=self.pfa_gather)
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
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_layer(self.num_heads, self.num_kv_heads, self.head_size)  # per rank, before any NPU call
        # per causality of the step (CommonAttentionMetadata.causal), computed once per layer
        self.pfa_mask_args = {causal: mask_arguments(self.sliding_window, causal) for causal in (True, False)}

    def _run_pfa(self, query, key, value, attn_metadata: PFAAscendMetadata, output) -> None:
        run_prefill(query, key, value, (self.key_cache, self.value_cache), attn_metadata.pfa_prefill, output,
                    num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                    scale=self.scale, mask_args=self.pfa_mask_args[attn_metadata.causal])

    def forward_impl(self, query, key, value, kv_cache, attn_metadata, output):
        plan = getattr(attn_metadata, "pfa_prefill", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward_impl(query, key, value, kv_cache, attn_metadata, output)
        split = plan.token_start
        if split:
            super().forward_impl(query[:split], leading_rows(key, split), leading_rows(value, split), kv_cache,
                                 _decode_rows(attn_metadata), output[:split])
            STATS.decode_tokens += split
        self._run_pfa(query, key, value, attn_metadata, output)
        return output

    def _forward_encoder_attention(self, query, key, value, attn_metadata, output):
        """vllm-ascend's path for bidirectional layers of pooling models: PFA without a mask (band for a window)."""
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

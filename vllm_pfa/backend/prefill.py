"""The platform-independent half of the PFA backend: planning a step's prefill (builder side, once per step: which
requests, in which calls, with which lengths) and the layer checks, for both platforms; and running a plan on CPU
(`run_prefill`, impl side, once per layer), where the CPU backend supplies how to read a request's K/V back from
vLLM's paged cache (`KVGather`). The Ascend adapter runs its plans on the device itself (ascend_attn, ascend_kv).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# vLLM's named ranges: a profiler range only where VLLM_CUSTOM_SCOPES_FOR_PROFILING=1 (each costs ~6 us per layer)
from vllm.v1.utils import record_function_or_nullcontext

from vllm_pfa.backend.staging import STAGING
from vllm_pfa.backend.stats import STATS
from vllm_pfa.ops import compressed_causal_mask, native_kernel, npu_prompt_flash_attention
from vllm_pfa.ops.layout import rows_at_unit_stride
from vllm_pfa.ops.validation import check_heads

# PFA's layout for vLLM's token-major [tokens, heads, head_size] tensors: with one prefill request BSND is a
# zero-copy view (B = 1); BNSD would need a transpose copy of q, k and v, and BSH is BSND with the last two axes
# merged (no cheaper). Several requests are padded to the longest one.
PFA_LAYOUT = "BSND"
FULL_SPARSE_MODE = 0  # without a mask: every key up to actual_seq_lengths_kv (bidirectional attention)
CAUSAL_SPARSE_MODE = 3  # rightDownCausal: new rows sit at the end of each request's kv sequence
BAND_SPARSE_MODE = 4  # sliding window: the band measured from the bottom-right corner

# (kv_cache, block_ids, seq_len, keys_out, values_out): writes the request's first seq_len keys and values
# into outputs of shape [>= seq_len, kv_heads, D]
KVGather = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor], None]


@dataclass
class PFACall:
    """The requests one PFA call covers, padded to the longest of them."""

    query_lens: list[int]  # actual_seq_lengths
    seq_lens: list[int]  # context + new tokens
    query_starts: list[int]  # per request, relative to the plan's token_start
    # CPU, per request: its block-table entries covering the whole sequence (the gather reads the blocks it needs:
    # the cached context, or every token for a layer that shares another layer's K/V); None on Ascend, whose
    # adapter reads K/V through its own per-step indices (ascend_kv)
    block_ids: list[torch.Tensor] | None
    # per request: the first key the call reads (a sliding window's layers need none before it); 0 elsewhere
    kv_starts: list[int]
    # CPU: the native kernel's call validated by the step's first layer of each geometry (heads, head size, scale,
    # dtype, mask arguments), which the step's other layers of that geometry run without validating again; None
    # where the kernel does not compute it
    direct_calls: dict[tuple, native_kernel.DirectCall | None] = field(default_factory=dict, repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def kv_lens(self) -> list[int]:
        """actual_seq_lengths_kv: the keys each request's rows attend to, from its kv_start on."""
        return [seq_len - start for seq_len, start in zip(self.seq_lens, self.kv_starts)]

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def has_context(self) -> bool:
        return any(seq_len > query_len for seq_len, query_len in zip(self.seq_lens, self.query_lens))


@dataclass
class PFAPrefillPlan:
    """Everything the PFA calls of one step need, shared by all layers."""

    token_start: int  # first prefill token in the batch (decodes come first)
    num_tokens: int
    calls: list[PFACall]
    atten_mask: torch.Tensor  # the cached compressed causal mask
    # CPU: reads K/V back from this group's cache (None: layout not readable, and then no call may read the cache;
    # always None on Ascend)
    gather: KVGather | None

    @property
    def has_context(self) -> bool:
        """Whether a call reads keys that are not among the step's new tokens (cached context)."""
        return any(call.has_context for call in self.calls)


def leading_rows(tokens: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The first `count` rows; None stays None (a layer sharing another layer's K/V gets none of its own)."""
    return None if tokens is None else tokens[:count]


def own_calls_then_rest(query_lens: dict[int, int], own_call_min_tokens: int | None) -> list[list[int]]:
    """Each request of at least `own_call_min_tokens` new tokens in a call of its own (B = 1: its q, and for a fresh
    request its k and v, are views, not copies); the rest in one call."""
    alone = [r for r, n in query_lens.items() if own_call_min_tokens is not None and n >= own_call_min_tokens]
    together = [r for r in query_lens if r not in alone]
    return [[r] for r in alone] + ([together] if together else [])


def consecutive_within_budget(query_lens: dict[int, int], kv_lens: dict[int, int], *, max_query_tokens: int,
                              max_kv_tokens: int) -> list[list[int]]:
    """Runs of consecutive requests whose padded batch stays within the budgets (B x longest query <=
    max_query_tokens, B x longest kv <= max_kv_tokens); a request over a budget on its own gets a call of its own.
    Consecutive requests keep each call's rows one contiguous slice of the batch."""
    groups: list[list[int]] = []
    longest_query = longest_kv = 0
    for r in query_lens:
        q, kv = max(longest_query, query_lens[r]), max(longest_kv, kv_lens[r])
        if groups and (len(groups[-1]) + 1) * q <= max_query_tokens and (len(groups[-1]) + 1) * kv <= max_kv_tokens:
            groups[-1].append(r)
            longest_query, longest_kv = q, kv
        else:
            groups.append([r])
            longest_query, longest_kv = query_lens[r], kv_lens[r]
    return groups


def window_start(seq_len: int, query_len: int, sliding_window: int | None) -> int:
    """The first key a causal request's new rows can see in a window of W keys (vLLM keeps j > i - W)."""
    if sliding_window is None:
        return 0
    return max(0, seq_len - query_len - (sliding_window - 1))


def plan_prefill(*, first: int, num_reqs: int, token_start: int, query_start: list[int], seq_lens_host: list[int],
                 device: torch.device, block_table: torch.Tensor | None = None, block_size: int | None = None,
                 gather: KVGather | None = None,
                 group: Callable[[dict[int, int], dict[int, int]], list[list[int]]] | None = None,
                 sliding_window: int | None = None) -> PFAPrefillPlan:
    """The plan for requests [first, num_reqs), from host-side lengths only (`seq_lens_host[r]`, exact).

    With a `block_table` (CPU: the gather reads the cache by blocks of `block_size` tokens) each request keeps the
    entries that cover its sequence. `group(query_lens, kv_lens)` splits the requests into calls (default: one
    call); with `sliding_window` (causal layers of one window) each request reads keys from its window's start only.
    """
    requests = range(first, num_reqs)
    query_len = {r: query_start[r + 1] - query_start[r] for r in requests}
    kv_start = {r: window_start(seq_lens_host[r], query_len[r], sliding_window) for r in requests}
    kv_len = {r: seq_lens_host[r] - kv_start[r] for r in requests}
    groups = group(query_len, kv_len) if group is not None else [list(requests)]
    calls = [
        PFACall(
            query_lens=[query_len[r] for r in members], seq_lens=[seq_lens_host[r] for r in members],
            query_starts=[query_start[r] - token_start for r in members],
            block_ids=None if block_table is None else
            [block_table[r, : -(-seq_lens_host[r] // block_size)].to(torch.long) for r in members],
            kv_starts=[kv_start[r] for r in members],
        )
        for members in groups
    ]
    return PFAPrefillPlan(token_start=token_start, num_tokens=sum(query_len.values()), calls=calls,
                          atten_mask=compressed_causal_mask(device), gather=gather)


def pfa_arguments(call: PFACall, plan: PFAPrefillPlan, *, num_heads: int, num_kv_heads: int, scale: float,
                  mask_args: dict) -> dict:
    """npu_prompt_flash_attention's keyword arguments for one call (the mask arguments override the plan's mask)."""
    return dict(num_heads=num_heads, num_key_value_heads=num_kv_heads, scale_value=scale, input_layout=PFA_LAYOUT,
                actual_seq_lengths=call.query_lens, actual_seq_lengths_kv=call.kv_lens,
                **({"atten_mask": plan.atten_mask} | mask_args))


def check_layer(num_heads: int, num_kv_heads: int, head_size: int) -> None:
    """Refuses, when the model's attention layers are built (start-up), a layer whose per-rank heads PFA's spec
    does not allow in the backend's layout; the error names the rule."""
    try:
        check_heads(num_heads, num_kv_heads, head_size, PFA_LAYOUT)
    except ValueError as exc:
        raise ValueError(f"The PFA attention backend cannot run this model's attention layers ({num_heads} query "
                         f"heads, {num_kv_heads} kv heads of size {head_size} per rank): {exc}") from None


def mask_arguments(sliding_window: int | None, causal: bool = True) -> dict:
    """PFA's mask arguments for a layer; they override the plan's compressed mask (`atten_mask=None`: no mask).

    Causal: rightDownCausal, or for a window of W keys (vLLM: j > i - W) the bottom-right band with
    pre_tokens = W - 1, next_tokens = 0. Bidirectional: every key, or for a window vLLM's |i - j| < W (CPU_ATTN's
    left and right window W - 1) as the band with pre_tokens = next_tokens = W - 1 (query rows sit at the end of
    the kv sequence: the band's bottom-right alignment).
    """
    windowed = sliding_window is not None and sliding_window >= 0
    if not windowed:
        return dict(sparse_mode=CAUSAL_SPARSE_MODE) if causal else dict(sparse_mode=FULL_SPARSE_MODE, atten_mask=None)
    return dict(sparse_mode=BAND_SPARSE_MODE, pre_tokens=sliding_window - 1,
                next_tokens=0 if causal else sliding_window - 1)


def _pack(tokens: torch.Tensor, call: PFACall, name: str) -> torch.Tensor:
    """[T, heads, D] new tokens -> [B, max_query_len, heads, D] (BSND), padded on the right (staging buffers). One
    request's rows are a view, at vLLM's token stride (the native kernel reads them in place; the op needs them
    contiguous), unless their D axis is strided (then a copy: the kernel reads rows of D)."""
    if call.num_requests == 1:
        start = call.query_starts[0]
        rows = tokens[start:start + call.query_lens[0]]
        return (rows if rows_at_unit_stride(rows) else rows.contiguous()).unsqueeze(0)
    packed = STAGING.view(name, tokens, call.num_requests, call.max_query_len, *tokens.shape[1:])
    for i, (start, n) in enumerate(zip(call.query_starts, call.query_lens)):
        packed[i, :n] = tokens[start:start + n]
    return packed


def _key_values(key, value, kv_cache, call: PFACall, gather: KVGather | None, like: torch.Tensor,
                kv_token_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_seq_len, kv_heads, D] keys and values (dtype and device of `like`): cached context (gathered) followed
    by the new tokens; for a layer that shares another layer's K/V (key None) every token from the cache, where that
    layer wrote them."""
    shared = key is None
    if not shared and not call.has_context:
        return _pack(key, call, "keys"), _pack(value, call, "values")
    shape = (call.num_requests, call.max_seq_len, *kv_token_shape)
    keys, values = STAGING.view("keys", like, *shape), STAGING.view("values", like, *shape)
    for i, (start, n, seq_len, block_ids) in enumerate(
            zip(call.query_starts, call.query_lens, call.seq_lens, call.block_ids)):
        cached = seq_len if shared else seq_len - n
        if cached:
            gather(kv_cache, block_ids, cached, keys[i], values[i])
            STATS.context_tokens += cached
        if not shared:
            keys[i, cached:seq_len], values[i, cached:seq_len] = key[start:start + n], value[start:start + n]
    return keys, values


def run_prefill(query, key, value, kv_cache, plan: PFAPrefillPlan, output, *, num_heads: int, num_kv_heads: int,
                head_size: int, scale: float, mask_args: dict) -> None:
    """The step's PFA calls for its prefill tokens, on CPU; results land in their rows of `output`
    ([tokens, heads, D])."""
    rows = slice(plan.token_start, plan.token_start + plan.num_tokens)
    query, new_rows = query[rows], output[rows]
    if key is not None:  # None: a layer that shares another layer's K/V (read from the cache)
        key, value = key[rows], value[rows]
    for call in plan.calls:
        with record_function_or_nullcontext("pfa_backend.pack_and_gather"):  # ranges: benchmarks/profile_backend.py
            keys, values = _key_values(key, value, kv_cache, call, plan.gather, query, (num_kv_heads, head_size))
            packed_query = _pack(query, call, "query")
        arguments = functools.partial(pfa_arguments, call, plan, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      scale=scale, mask_args=mask_args)
        with record_function_or_nullcontext("pfa_backend.operator"):
            # Our CPU implementation: the native kernel writes the rows of `output` itself (no result tensor to
            # copy back).
            geometry = (num_heads, num_kv_heads, head_size, scale, query.dtype, *mask_args.items())
            if geometry not in call.direct_calls:
                call.direct_calls[geometry] = native_kernel.prepare_direct(packed_query, keys, values, **arguments())
            direct = call.direct_calls[geometry]
            if direct is not None and native_kernel.run_direct(direct, new_rows, call.query_starts, packed_query,
                                                                keys, values):
                STATS.prefill_calls += 1
                continue
            out = npu_prompt_flash_attention(packed_query.contiguous(), keys.contiguous(), values.contiguous(),
                                             **arguments())
        with record_function_or_nullcontext("pfa_backend.unpack"):
            out = out.view(call.num_requests, -1, num_heads, head_size)
            for i, (start, n) in enumerate(zip(call.query_starts, call.query_lens)):
                new_rows[start:start + n] = out[i, :n]
        STATS.prefill_calls += 1
    STATS.prefill_tokens += plan.num_tokens

"""A CPU stand-in for `torch_npu`, for the Ascend contract suite only (never installed, never on a real NPU host).

It provides what vllm-ascend's released platform and attention modules touch: the `torch.npu` names they read at
import time, torch_npu's extra dtypes, and the few operators their attention path calls, each written from its
documented semantics in plain torch (not from vllm-pfa's code, except `npu_prompt_flash_attention`, which stands for
torch_npu's PFA and runs vllm-pfa's CPU implementation of it). Every operator call is recorded in `CALLS`, so tests
can assert which path computed which rows and with which arguments. Each operator has the signature torch_npu
registers (tests/test_torch_npu_contract.py checks it against the released wheel) and refuses, by name, arguments it
does not implement.

What it cannot stand for: kernel numerics on the NPU, graph capture, device memory, and the 310P / A5 operators.
"""

import inspect
import sys
import types
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.distributed

__version__ = "2.10.0.post4+cpu-standin"  # the torch_npu release vllm-ascend 0.30.0rc2 pairs with


@dataclass
class Call:
    name: str
    kwargs: dict = field(default_factory=dict)


CALLS: list[Call] = []


def _record(name: str, **kwargs) -> None:
    CALLS.append(Call(name, kwargs))


class _DType:
    """torch_npu's own dtypes (fp4/fp8 variants) exist only as names here: nothing in this suite computes in them."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch_npu.{self.name}"


float4_e2m1fn_x2 = _DType("float4_e2m1fn_x2")
hifloat8 = _DType("hifloat8")
float8_e8m0fnu = _DType("float8_e8m0fnu")


# --- torch.npu: the names vllm-ascend reads at import time; no device is available ---------------------------------
class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NPUGraph:
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("torch_npu stand-in: graph capture needs an NPU")


class _NeedsAnNPU:
    """A torch.npu / torch_npu._C class vllm-ascend's model runners name at import time (annotations, class fields),
    never constructed in this suite."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError(f"torch_npu stand-in: {type(self).__name__} needs an NPU")


class _Stream(_NeedsAnNPU):
    pass


class _ExternalEvent(_NeedsAnNPU):
    pass


class _NPUTaskGroupHandle(_NeedsAnNPU):
    pass


_npu = types.ModuleType("torch.npu")
_npu.Event = _Event
_npu.NPUGraph = _NPUGraph
_npu.Stream = _Stream
_npu.ExternalEvent = _ExternalEvent
_npu.config = types.SimpleNamespace(allow_internal_format=False)  # set by vllm-ascend's V1 runner on import
_C = types.ModuleType("torch_npu._C")
_C._NPUTaskGroupHandle = _NPUTaskGroupHandle
sys.modules["torch_npu._C"] = _C
_npu.is_available = lambda: False
_npu.is_initialized = lambda: False
_npu.device_count = lambda: 0
# torch.manual_seed seeds the PrivateUse1 device's generators through these two (torch_npu.npu has both), and warns
# "Set seed for `npu` device does not take effect" where they are missing; with no NPU there is nothing to seed.
_npu._is_in_bad_fork = lambda: False
_npu.manual_seed_all = lambda seed: None


def _needs_an_npu(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"torch_npu stand-in: torch.npu.{name} needs an NPU")

    return call


# Read (not called) when vllm-ascend's global patches redirect torch.accelerator's memory API to torch.npu's.
for _name in ("empty_cache", "memory_stats", "memory_reserved", "reset_peak_memory_stats", "mem_get_info"):
    setattr(_npu, _name, _needs_an_npu(_name))
torch.npu = _npu
sys.modules["torch.npu"] = _npu
# As torch_npu does on import: the PrivateUse1 device is named "npu" (vLLM's DeviceConfig builds torch.device("npu")
# for vllm-ascend's platform), and torch.distributed gains HCCL's probe (vllm-ascend's model loader imports it).
torch.utils.rename_privateuse1_backend("npu")
torch.distributed.is_hccl_available = lambda: False

# vllm-ascend pins host tensors before copying them to the NPU; CPU-only torch refuses to pin without an accelerator,
# and on CPU the copy that follows is a no-op, so pinning is too.
torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


# --- operators -----------------------------------------------------------------------------------------------------
def _refuse_unimplemented(op: Callable, arguments: dict, implemented: Collection[str] = ()) -> None:
    """An op here implements only what vllm-ascend's paths in this suite use: any other argument given a value other
    than torch_npu's default is refused, by name, rather than silently ignored."""
    for name, param in inspect.signature(op).parameters.items():
        if name in implemented or param.default is inspect.Parameter.empty:
            continue
        value = arguments[name]
        differs = value is not None if param.default is None else value != param.default
        if differs:
            raise NotImplementedError(f"torch_npu stand-in: {op.__name__} does not implement {name}")


def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    """Writes token t's key/value into slot `slot_mapping[t]` of `[num_blocks, block_size, kv_heads, head]` caches
    (slot = block * block_size + offset); negative slots are skipped. Only `cache_mode="Norm"` (the ND layout
    vllm-ascend's caches use here), not the default NZ layout."""
    _refuse_unimplemented(npu_scatter_pa_kv_cache, locals(), implemented={"cache_mode"})
    if cache_mode != "Norm":
        raise NotImplementedError(f"torch_npu stand-in: npu_scatter_pa_kv_cache does not implement "
                                  f"cache_mode={cache_mode!r}")
    _record("npu_scatter_pa_kv_cache", num_tokens=key.shape[0], cache_mode=cache_mode)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for cache, tokens in ((key_cache, key), (value_cache, value)):  # any strides (vllm-ascend's interleaved K/V)
        block_size = cache.shape[1]
        cache[slots // block_size, slots % block_size] = tokens[keep].view(-1, *cache.shape[2:]).to(cache.dtype)


def _paged_tokens(cache: torch.Tensor, block_ids: torch.Tensor, length: int, kv_heads: int) -> torch.Tensor:
    """The first `length` tokens `[length, kv_heads, head]` of a request, from a paged cache
    `[num_blocks, block_size, kv_heads, head]` or its `[num_blocks, block_size, kv_heads * head]` view."""
    head_size = cache[0, 0].numel() // kv_heads
    return cache[block_ids.long()].flatten(0, 1)[:length].reshape(length, kv_heads, head_size)


def _attend(q, k, v, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """Softmax attention in fp32 for one request: q `[Sq, N, D]`, k/v `[Skv, Nkv, D]`, keep `[Sq, Skv]` (bool);
    rows with no kept key are 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qnd,knd->nqk", q.float(), k) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nqk,knd->qnd", probs, v).to(q.dtype)


def _keep(sq: int, skv: int, sparse_mode: int, pre_tokens: int, next_tokens: int) -> torch.Tensor:
    """Which keys each query row keeps, per FIA's documented sparse modes (positions from the bottom-right corner
    for modes 3 and 4; mode 0 without a mask keeps all)."""
    i = torch.arange(sq).unsqueeze(1) + (skv - sq)
    j = torch.arange(skv).unsqueeze(0)
    if sparse_mode == 0:
        return torch.ones(sq, skv, dtype=torch.bool)
    if sparse_mode == 3:
        return j <= i
    if sparse_mode == 4:
        return (j >= i - pre_tokens) & (j <= i + next_tokens)
    raise NotImplementedError(f"torch_npu stand-in: FIA sparse_mode={sparse_mode}")


def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
    antiquant_scale=None, antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None, query_padding_size=None,
    kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
    query_rope=None, key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
    next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
    antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0, softmax_lse_flag=False,
):
    """FIA in the TND layout vllm-ascend uses: query `[T, N, D]` with cumulative `actual_seq_lengths`; with a
    `block_table`, key/value are paged caches `[num_blocks, block_size, Nkv*D]` (or `[.., Nkv, D]`) and
    `actual_seq_lengths_kv` the per-request kv lengths; without one, key/value are `[T, Nkv, D]` in TND.
    Returns (attention_out `[T, N, D]`, softmax_lse placeholder)."""
    _refuse_unimplemented(npu_fused_infer_attention_score, locals(), implemented={
        "atten_mask", "actual_seq_lengths", "actual_seq_lengths_kv", "block_table", "num_heads", "scale",
        "pre_tokens", "next_tokens", "input_layout", "num_key_value_heads", "sparse_mode", "block_size"})
    if input_layout != "TND":
        raise NotImplementedError(f"torch_npu stand-in: FIA input_layout={input_layout}")
    kv_heads = num_key_value_heads or num_heads
    ends = [int(x) for x in actual_seq_lengths]
    kv_lens = [int(x) for x in (actual_seq_lengths_kv if block_table is not None else ends)]
    _record("npu_fused_infer_attention_score", num_tokens=ends[-1], query_lens=ends, kv_lens=kv_lens,
            sparse_mode=sparse_mode, paged=block_table is not None, block_size=block_size,
            pre_tokens=pre_tokens, next_tokens=next_tokens)
    out = torch.zeros_like(query)
    kv_start = 0
    for b, end in enumerate(ends):
        start = ends[b - 1] if b else 0
        if block_table is not None:
            k = _paged_tokens(key, block_table[b, : -(-kv_lens[b] // block_size)], kv_lens[b], kv_heads)
            v = _paged_tokens(value, block_table[b, : -(-kv_lens[b] // block_size)], kv_lens[b], kv_heads)
        else:  # TND key/value: cumulative like the query
            k, v = key[kv_start:kv_lens[b]], value[kv_start:kv_lens[b]]
            kv_start = kv_lens[b]
        keep = _keep(end - start, k.shape[0], sparse_mode, pre_tokens, next_tokens)
        out[start:end] = _attend(query[start:end], k, v, scale, keep)
    return out, None


def _npu_paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table,
                         context_lens, out, *, workspace=None):
    """Decode: each query row `[B, N, D]` attends to all `context_lens[b]` cached tokens of its request. (Not an
    `npu::` op: torch_npu's ATB extension registers it as `atb::_npu_paged_attention` and sets it on the module.)"""
    _refuse_unimplemented(_npu_paged_attention, locals())
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        # vllm-ascend allocates contiguous K/V for every layer it sends to paged attention
        # (attention/utils.py: requires_contiguous_pa_kv_cache); the kernel addresses blocks by a dense layout.
        raise RuntimeError("torch_npu stand-in: _npu_paged_attention needs contiguous key/value caches")
    _record("_npu_paged_attention", num_tokens=query.shape[0])
    block_size = key_cache.shape[1]
    for b in range(query.shape[0]):
        length = int(context_lens[b])
        ids = block_table[b, : -(-length // block_size)]
        k = _paged_tokens(key_cache, ids, length, num_kv_heads)
        v = _paged_tokens(value_cache, ids, length, num_kv_heads)
        out[b: b + 1] = _attend(query[b: b + 1], k, v, scale_value, torch.ones(1, length, dtype=torch.bool))


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """vllm-ascend's encoder (pooling) path; nothing in this suite may reach it."""
    _record("npu_fusion_attention")
    raise NotImplementedError("torch_npu stand-in: npu_fusion_attention is not stood in for")


def npu_prompt_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None, pse_shift=None,
                               actual_seq_lengths=None, deq_scale1=None, quant_scale1=None, deq_scale2=None,
                               quant_scale2=None, quant_offset2=None, num_heads=1, scale_value=1.0,
                               pre_tokens=2147483647, next_tokens=0, input_layout="BSH", num_key_value_heads=0,
                               actual_seq_lengths_kv=None, sparse_mode=0):
    """torch_npu's PFA: stands for the NPU kernel by running vllm-pfa's CPU implementation of the same contract."""
    arguments = dict(locals())
    _record("npu_prompt_flash_attention", **arguments)
    del arguments["query"], arguments["key"], arguments["value"]
    return torch.ops.vllm_pfa.npu_prompt_flash_attention(query, key, value, **arguments)

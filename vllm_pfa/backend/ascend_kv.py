"""Reading the prefill requests' K/V back from vllm-ascend's paged KV cache: one gather per PFA call and layer, over
the cache's own storage, whatever its strides (pure torch: runs, and is tested, anywhere).

vllm-ascend's cache for one layer is K and V of `[num_blocks, block_size, kv_heads, head]` each, or
`[num_blocks, kv_heads, block_size, head]` with `VLLM_KV_CACHE_LAYOUT` HND / LBHNC. Its model runners (V1 and V2)
allocate them block-interleaved (K block b, then V block b, in one allocation) and hand the impl two
non-contiguous views; `index_select` on such a view makes it contiguous first on an NPU, i.e. copies the whole
layer's cache half. So the gather reads rows of the storage itself: a contiguous `[rows, row_elems]` view from K's
offset, and per-step row indices (a token's heads are one row when they are adjacent, else one row per head); K and
V in one storage come out of a single `index_select`.

vllm-ascend writes a step's new K/V into the cache before its attention runs (`reshape_and_cache` in `forward`), and
a KV-sharing layer's target wrote them, so every key of a prefill (cached context and new tokens) is read from the
cache. The row indices depend only on the cache geometry, which all layers of a group share: they are computed once
per step (by the first layer) and reused.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_pfa.backend.prefill import PFACall


@dataclass(frozen=True)
class CacheGeometry:
    """Where token t of block b (head h) of K and V starts, in rows of `row_elems` elements of the cache storage."""

    block_size: int
    num_kv_heads: int
    head_size: int
    row_elems: int  # a token's kv_heads x head (heads adjacent) or one head
    block_stride: int  # rows
    token_stride: int  # rows
    head_stride: int  # rows; used when a row is one head
    key_base: int  # row of K[0, 0, 0] from the storage view's start
    value_base: int | None  # row of V[0, 0, 0] in the same storage; None: V is an allocation of its own

    @property
    def rows_per_token(self) -> int:
        return self.num_kv_heads * self.head_size // self.row_elems


def cache_geometry(key_cache: torch.Tensor, value_cache: torch.Tensor, *,
                   heads_major: bool) -> CacheGeometry | None:
    """The geometry of a layer's K/V views, or None where they are not row-addressable (the head dimension not
    dense, strides or offsets not whole rows): such a cache is gathered block by block (`gather_blocks`)."""
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride() or key_cache.dim() != 4:
        return None
    if heads_major:
        _, kv_heads, block_size, head_size = key_cache.shape
        block_stride, head_stride, token_stride, unit = key_cache.stride()
    else:
        _, block_size, kv_heads, head_size = key_cache.shape
        block_stride, token_stride, head_stride, unit = key_cache.stride()
    if unit != 1:
        return None
    row_elems = kv_heads * head_size if (head_stride == head_size or kv_heads == 1) else head_size
    same_storage = key_cache.untyped_storage().data_ptr() == value_cache.untyped_storage().data_ptr()
    origin = min(key_cache.storage_offset(), value_cache.storage_offset()) if same_storage \
        else key_cache.storage_offset()
    offsets = [key_cache.storage_offset() - origin] + (
        [value_cache.storage_offset() - origin] if same_storage else [])
    strides = [block_stride, token_stride] + ([head_stride] if row_elems == head_size else [])
    if any(x % row_elems for x in strides + offsets):
        return None
    return CacheGeometry(
        block_size=block_size, num_kv_heads=kv_heads, head_size=head_size, row_elems=row_elems,
        block_stride=block_stride // row_elems, token_stride=token_stride // row_elems,
        head_stride=head_stride // row_elems, key_base=offsets[0] // row_elems,
        value_base=offsets[1] // row_elems if same_storage else None)


def storage_rows(cache: torch.Tensor, geometry: CacheGeometry, *, origin: int) -> torch.Tensor:
    """`[rows, row_elems]`: the cache's storage from element `origin` on, as a contiguous view (no copy)."""
    elements = cache.untyped_storage().nbytes() // cache.element_size() - origin
    rows = elements // geometry.row_elems
    return torch.as_strided(cache, (rows, geometry.row_elems), (geometry.row_elems, 1), origin)


def _origin(key_cache: torch.Tensor, value_cache: torch.Tensor, geometry: CacheGeometry) -> int:
    if geometry.value_base is None:
        return key_cache.storage_offset()
    return min(key_cache.storage_offset(), value_cache.storage_offset())


@dataclass
class CallIndices:
    """One PFA call's per-step indices (device tensors), shared by every layer of the group."""

    query_rows: slice  # the call's rows of the step's prefill rows (its requests are consecutive)
    batch: int
    max_query_len: int
    max_kv_len: int
    query_index: torch.Tensor | None  # [B * Sq]: row of query_rows per padded position; None when B = 1
    output_index: torch.Tensor | None  # [sum of query lens]: padded position per row; None when B = 1
    kv_requests: torch.Tensor  # [B * Skv]: block-table row of each padded key position
    kv_positions: torch.Tensor  # [B * Skv]: the token it reads (padding repeats the request's last key)
    rows: dict[CacheGeometry, torch.Tensor] = field(default_factory=dict)  # per geometry: K rows, then V rows


def build_call_indices(calls: list[PFACall], first: int, device: torch.device) -> list[CallIndices]:
    """Host-side index arrays of every call of the step, moved to the device in one copy.

    Padding positions point at a real row of the same request (its last query row, its last key), not at
    uninitialized memory: an NPU kernel's tile tail may multiply a padding row by a zero probability, and a
    finite value keeps 0 x value at 0."""
    pieces, layouts = [], []
    request = first
    for call in calls:
        q_lens, kv_lens = np.array(call.query_lens), np.array(call.kv_lens)
        batch, max_q, max_kv = len(q_lens), int(q_lens.max()), int(kv_lens.max())
        starts = np.array(call.query_starts) - call.query_starts[0]
        query_index = (starts[:, None] + np.minimum(np.arange(max_q)[None], q_lens[:, None] - 1)).ravel()
        output_index = np.concatenate([b * max_q + np.arange(n) for b, n in enumerate(q_lens)])
        kv_requests = np.repeat(np.arange(request, request + batch), max_kv)
        kv_positions = (np.array(call.kv_starts)[:, None]
                        + np.minimum(np.arange(max_kv)[None], kv_lens[:, None] - 1)).ravel()
        request += batch
        layouts.append((batch, max_q, max_kv, slice(call.query_starts[0], call.query_starts[0] + int(q_lens.sum()))))
        pieces += [query_index, output_index, kv_requests, kv_positions]
    flat = torch.from_numpy(np.concatenate(pieces).astype(np.int64)).to(device, non_blocking=True)
    out, offset = [], 0
    for batch, max_q, max_kv, rows in layouts:
        sizes = (batch * max_q, rows.stop - rows.start, batch * max_kv, batch * max_kv)
        query_index, output_index, kv_requests, kv_positions = flat[offset:offset + sum(sizes)].split(sizes)
        offset += sum(sizes)
        single = batch == 1
        out.append(CallIndices(query_rows=rows, batch=batch, max_query_len=max_q, max_kv_len=max_kv,
                               query_index=None if single else query_index,
                               output_index=None if single else output_index,
                               kv_requests=kv_requests, kv_positions=kv_positions))
    return out


def key_value_rows(indices: CallIndices, geometry: CacheGeometry, block_table: torch.Tensor) -> torch.Tensor:
    """The storage rows of the call's padded keys, then of its values (`[2 * B * Skv * rows_per_token]`); computed
    by the first layer of a step, reused by the others."""
    rows = indices.rows.get(geometry)
    if rows is not None:
        return rows
    positions = indices.kv_positions
    blocks = block_table[indices.kv_requests, torch.div(positions, geometry.block_size, rounding_mode="floor")]
    token_rows = (blocks.to(torch.long) * geometry.block_stride
                  + (positions % geometry.block_size) * geometry.token_stride)
    if geometry.rows_per_token > 1:  # one row per head
        heads = torch.arange(geometry.rows_per_token, device=positions.device) * geometry.head_stride
        token_rows = (token_rows[:, None] + heads[None]).reshape(-1)
    value_base = geometry.key_base if geometry.value_base is None else geometry.value_base
    rows = indices.rows[geometry] = torch.cat([token_rows + geometry.key_base, token_rows + value_base])
    return rows


def gather_keys_values(key_cache: torch.Tensor, value_cache: torch.Tensor, geometry: CacheGeometry,
                       rows: torch.Tensor, out: torch.Tensor) -> None:
    """Writes the call's padded keys into `out[0]` and values into `out[1]` (`out`: `[2, B * Skv * rows_per_token,
    row_elems]`): one index_select when K and V share a storage, else one each."""
    half = rows.shape[0] // 2
    if geometry.value_base is not None:
        torch.index_select(storage_rows(key_cache, geometry, origin=_origin(key_cache, value_cache, geometry)), 0,
                           rows, out=out.view(-1, geometry.row_elems))
        return
    for half_index, cache in enumerate((key_cache, value_cache)):
        torch.index_select(storage_rows(cache, geometry, origin=cache.storage_offset()), 0,
                           rows[half_index * half:(half_index + 1) * half], out=out[half_index])


def gather_by_index(key_cache: torch.Tensor, value_cache: torch.Tensor, indices: CallIndices,
                    block_table: torch.Tensor, *, heads_major: bool, out: torch.Tensor) -> None:
    """For a cache that is not row-addressable (`cache_geometry` None): advanced indexing on the K/V views (which
    may copy them on an NPU); `out`: `[2, B * Skv, kv_heads, head]`."""
    positions = indices.kv_positions
    block_size = key_cache.shape[2] if heads_major else key_cache.shape[1]
    blocks = block_table[indices.kv_requests, torch.div(positions, block_size, rounding_mode="floor")].to(torch.long)
    offsets = positions % block_size
    for half, cache in enumerate((key_cache, value_cache)):
        out[half] = cache[blocks, :, offsets] if heads_major else cache[blocks, offsets]

"""The block interior layout of vLLM's CPU paged KV cache, recognized through vLLM's own writer.

A CPU_ATTN layer cache is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, viewed as key and value halves
`[num_blocks, num_kv_heads, block_size, head_size]`. How a block's tokens are laid out inside depends on the ISA
chosen by vLLM (for "vec"/"vec16" a key block is stored transposed, `[head_size, block_size]`, and a value block
plain; for "amx" both are packed in VNNI pairs, keys by pairs of dimensions, values by pairs of tokens). Rather than
trusting that, `probe` writes patterns with `cpu_attn_reshape_and_cache` and recognizes the layout: one of the two
plain/transposed ones (read by the native one-pass gather), or else any permutation of a head's block (read through
its index map); for anything else it returns None and callers use vLLM's own op or the existing path.
Both directions use the same token view: reading context back (the backend) and writing K/V (the operator's
delegation to vLLM's kernel, where a strided torch copy is about twice as fast as the per-token op).
"""

import functools
from dataclasses import dataclass, field

import torch

from vllm_pfa.ops.native_kernel import extension


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves of a CPU_ATTN layer cache, as vLLM's CPU backend views them."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    return key_cache, value_cache


def _token_view(cache_half: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A `[num_blocks, block_size, kv_heads, head]` view (no copy) of one cache half."""
    num_blocks, heads, block_size, head_size = cache_half.shape
    if transposed:
        return cache_half.view(num_blocks, heads, head_size, block_size).permute(0, 3, 1, 2)
    return cache_half.permute(0, 2, 1, 3)


def blocks_for(block_ids: torch.Tensor, seq_len: int, kv_cache: torch.Tensor) -> torch.Tensor:
    """The first block ids, of a request's row, that hold its first `seq_len` tokens (the row may cover more)."""
    return block_ids[: -(-seq_len // kv_cache.shape[2])]


def copy_tokens(blocks: torch.Tensor, seq_len: int, out: torch.Tensor) -> None:
    """out[:seq_len] = the first `seq_len` tokens of `[n, block_size, kv_heads, head]` blocks (a view is fine)."""
    block_size = blocks.shape[1]
    full, rest = divmod(seq_len, block_size)
    if full:
        out[: full * block_size].view(full, block_size, *out.shape[1:]).copy_(blocks[:full])
    if rest:
        out[full * block_size: seq_len].copy_(blocks[full, :rest])


@dataclass(frozen=True)
class CpuKVLayout:
    key_transposed: bool
    value_transposed: bool

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, keys_out: torch.Tensor,
               values_out: torch.Tensor) -> None:
        """Writes one request's first `seq_len` keys and values into `[>= seq_len, kv_heads, head]` outputs."""
        block_ids = blocks_for(block_ids, seq_len, kv_cache)
        native = extension()
        if native is not None and keys_out.stride(-1) == 1 and values_out.stride(-1) == 1:
            key_cache, value_cache = split_kv_cache(kv_cache)
            native.gather_paged_kv(key_cache, value_cache, block_ids, seq_len, keys_out, values_out,
                                   self.key_transposed, self.value_transposed)  # one pass instead of three
            return
        for half, out, transposed in zip(split_kv_cache(kv_cache), (keys_out, values_out),
                                         (self.key_transposed, self.value_transposed)):
            blocks = half.index_select(0, block_ids)  # whole blocks: plain copies
            if transposed:  # [head, block] interiors to [block, head]: a 2-D transpose pass beats one strided copy
                num_blocks, heads, block_size, head_size = blocks.shape
                blocks = blocks.view(num_blocks, heads, head_size, block_size).transpose(2, 3).contiguous()
            copy_tokens(blocks.transpose(1, 2), seq_len, out)

    def write(self, key_cache: torch.Tensor, value_cache: torch.Tensor, first_block: int, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Writes `[n, kv_heads, head]` keys/values into consecutive blocks starting at `first_block`."""
        block_size = key_cache.shape[2]
        full, rest = divmod(keys.shape[0], block_size)
        for half, tokens, transposed in ((key_cache, keys, self.key_transposed),
                                         (value_cache, values, self.value_transposed)):
            view = _token_view(half, transposed)
            if full:
                blocks = tokens[: full * block_size].unflatten(0, (full, -1))  # [full, block, heads, head]
                if transposed:  # head-major first, then a 2-D transpose pass (faster than one strided copy)
                    blocks = blocks.transpose(1, 2).contiguous().transpose(1, 2)
                view[first_block:first_block + full].copy_(blocks)
            if rest:
                view[first_block + full, :rest].copy_(tokens[full * block_size:])


@dataclass(frozen=True)
class PermutedKVLayout:
    """A layout in which each head's block is some permutation of its `[block_size, head_size]` tokens (vLLM's AMX
    VNNI packing): `key_index[t, d]` / `value_index[t, d]` is where token t's dimension d lies in the head's block."""

    key_index: torch.Tensor
    value_index: torch.Tensor
    key_tile: int | None = field(init=False)  # the tiled VNNI packing each index is, found once (_pair_tile)
    value_tile: int | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_tile", _pair_tile(self.key_index, keys=True))
        object.__setattr__(self, "value_tile", _pair_tile(self.value_index, keys=False))

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, keys_out: torch.Tensor,
               values_out: torch.Tensor) -> None:
        block_ids = blocks_for(block_ids, seq_len, kv_cache)
        for half, index, tile, keys, out in zip(split_kv_cache(kv_cache), (self.key_index, self.value_index),
                                                (self.key_tile, self.value_tile), (True, False),
                                                (keys_out, values_out)):
            blocks = half.index_select(0, block_ids).flatten(2)  # [n, heads, block * head]: only this request's
            copy_tokens(_unpermuted(blocks, index, tile, keys), seq_len, out)

    def write(self, key_cache: torch.Tensor, value_cache: torch.Tensor, first_block: int, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        num_blocks, block_size = -(-keys.shape[0] // key_cache.shape[2]), key_cache.shape[2]
        for half, index, tokens in ((key_cache, self.key_index, keys), (value_cache, self.value_index, values)):
            padded = tokens.new_zeros(num_blocks * block_size, *tokens.shape[1:])
            padded[: tokens.shape[0]] = tokens
            packed = padded.new_empty(num_blocks, tokens.shape[1], index.numel())
            packed[:, :, index.flatten()] = padded.unflatten(0, (num_blocks, block_size)).transpose(1, 2).flatten(2)
            half[first_block:first_block + num_blocks] = packed.view(half[first_block:first_block + num_blocks].shape)


def _pair_tile(index: torch.Tensor, keys: bool) -> int | None:
    """The tile of vLLM's AMX packing this permutation is, if it is one: keys `[block / T][head / 2][T tokens][2
    dims]`, values `[head / C][block / 2][C dims][2 tokens]` (T = C = 16 in vLLM 0.32)."""
    block_size, head_size = index.shape
    token, dim = torch.arange(block_size)[:, None], torch.arange(head_size)[None, :]
    for tile in (16, 32, 8, 64, 128, 256):
        if keys and block_size % tile == 0 and head_size % 2 == 0 and torch.equal(
                index, (token // tile) * (tile * head_size) + (dim // 2) * (2 * tile) + (token % tile) * 2 + dim % 2):
            return tile
        if not keys and head_size % tile == 0 and block_size % 2 == 0 and torch.equal(
                index, (dim // tile) * (block_size * tile) + (token // 2) * (2 * tile) + (dim % tile) * 2 + token % 2):
            return tile
    return None


def _unpermuted(blocks: torch.Tensor, index: torch.Tensor, tile: int | None, keys: bool) -> torch.Tensor:
    """`[n, block, heads, head]` tokens of `[n, heads, block * head]` permuted 16-bit blocks. A VNNI pair is one
    32-bit word, so the packing's tiles come apart as transposes of words (keys: one copy; values: two, the second
    splitting each word's two tokens) instead of an element-wise gather (~0.7 GB/s measured, a third of a chunked
    prefill's attention time on AMX)."""
    n, heads = blocks.shape[:2]
    block_size, head_size = index.shape
    if tile is None or blocks.element_size() != 2:
        return blocks[:, :, index].transpose(1, 2)
    words = blocks.view(torch.int32)
    if keys:
        words = words.view(n, heads, block_size // tile, head_size // 2, tile).permute(0, 2, 4, 1, 3)
        return words.reshape(n, block_size, heads, head_size // 2).view(blocks.dtype)
    words = words.view(n, heads, head_size // tile, block_size // 2, tile).permute(0, 3, 1, 2, 4)
    pairs = words.reshape(n, block_size // 2, heads, head_size).view(blocks.dtype)  # (even, odd) token per dim
    return pairs.view(n, block_size // 2, heads, head_size, 2).permute(0, 1, 4, 2, 3).reshape(
        n, block_size, heads, head_size)


def _positions(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[torch.Tensor, ...] | None:
    """Per cache half, which (token, head, dimension) each element of a written block holds, as three `[heads,
    block * head]` tensors; None where vLLM cannot write this layout. Three passes: each coordinate is written as a
    small integer, exact in every float dtype (block and head sizes are at most 256)."""
    from vllm import _custom_ops as ops

    num_kv_heads = 2
    token, head, dim = torch.meshgrid(torch.arange(block_size), torch.arange(num_kv_heads), torch.arange(head_size),
                                      indexing="ij")
    halves = []
    for coordinate in (token, head, dim):
        kv_cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = split_kv_cache(kv_cache)
        written = (coordinate + 1).to(dtype)  # 0: never written
        try:
            ops.cpu_attn_reshape_and_cache(written, written, key_cache, value_cache, torch.arange(block_size), isa)
        except RuntimeError:
            return None
        halves.append((key_cache[0].flatten(1).long() - 1, value_cache[0].flatten(1).long() - 1))
    return tuple(zip(*halves))  # ((key token, key head, key dim), (value token, value head, value dim))


def _permutation(token: torch.Tensor, head: torch.Tensor, dim: torch.Tensor) -> torch.Tensor | None:
    """`index[t, d]`, the position of (t, d) in a head's block, if every head's block is the same permutation."""
    block_size, head_size = int(token.max()) + 1, int(dim.max()) + 1
    heads = torch.arange(head.shape[0])[:, None].expand_as(head)
    if token.min() < 0 or not torch.equal(head, heads):
        return None
    index = torch.full((block_size * head_size,), -1, dtype=torch.long)
    index[token[0] * head_size + dim[0]] = torch.arange(block_size * head_size)
    if (index < 0).any() or not torch.equal(token[0], token[1]) or not torch.equal(dim[0], dim[1]):
        return None
    return index.view(block_size, head_size)


@functools.cache
def probe(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> CpuKVLayout | PermutedKVLayout | None:
    """The layout `cpu_attn_reshape_and_cache` writes with this ISA, or None if unrecognized."""
    positions = _positions(isa, dtype, block_size, head_size)
    if positions is None:
        return None
    indices = [_permutation(*half) for half in positions]
    if any(index is None for index in indices):
        return None
    plain = torch.arange(block_size * head_size).view(block_size, head_size)  # (t, d) at t * head + d
    transposed = torch.arange(head_size)[None, :] * block_size + torch.arange(block_size)[:, None]  # at d * block + t
    flags = []
    for index in indices:
        if torch.equal(index, plain):
            flags.append(False)
        elif torch.equal(index, transposed):
            flags.append(True)
        else:
            return PermutedKVLayout(*indices)
    return CpuKVLayout(*flags)

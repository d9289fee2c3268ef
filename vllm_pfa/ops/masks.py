"""Which keys a query row keeps, per sparse_mode, and the cached compressed causal mask.

Rows `i` and columns `j` are absolute positions from the top-left of one batch; `d = akv - aq` aligns modes 3 and 4
to the bottom-right corner. Modes 2/3/4 are index rules (their 2048x2048 mask only tells the NPU kernel which tiles
to skip), so nothing S1 x S2 is ever built for them from a mask.
"""

import torch

from vllm_pfa.ops.validation import COMPRESSED_MASK_SIZE

_UNBOUNDED = 2**40
_compressed_masks: dict[torch.device, torch.Tensor] = {}


def compressed_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """`triu(ones(2048, 2048), 1)` as int8 (1 = masked out), built once per device per process."""
    device = torch.device(device)
    mask = _compressed_masks.get(device)
    if mask is None:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.int8, device=device)
        mask = _compressed_masks[device] = torch.triu(ones, diagonal=1)
    return mask


def band_offsets(mode: int, has_mask: bool, aq: int, akv: int, pre: int, nxt: int) -> tuple[int, int]:
    """(lo, hi): row i keeps columns i + lo <= j <= i + hi (before the mask and j < akv), per sparse_mode.

    Offsets beyond any sequence length mean "unbounded" and are clamped to +-2**40, so int64 arithmetic on them
    cannot overflow.
    """
    d = akv - aq
    if mode == 0 and has_mask:  # the pre/next band applies only together with a mask
        lo, hi = -pre, nxt
    elif mode == 2:
        lo, hi = -_UNBOUNDED, 0
    elif mode == 3:
        lo, hi = -_UNBOUNDED, d
    elif mode == 4:
        lo, hi = d - pre, d + nxt
    else:  # mode 0 without a mask, mode 1: the mask alone decides
        lo, hi = -_UNBOUNDED, _UNBOUNDED
    return max(-_UNBOUNDED, min(lo, _UNBOUNDED)), max(-_UNBOUNDED, min(hi, _UNBOUNDED))


def key_range(mode: int, has_mask: bool, row_start: int, row_end: int, aq: int, akv: int, pre: int,
              nxt: int) -> tuple[int, int]:
    """[lo, hi) bounding the kept columns of rows [row_start, row_end); rows past aq keep nothing."""
    row_end = min(row_end, aq)
    if row_start >= row_end:
        return 0, 0
    band_lo, band_hi = band_offsets(mode, has_mask, aq, akv, pre, nxt)
    lo, hi = max(row_start + band_lo, 0), min(row_end + band_hi, akv)
    return (lo, hi) if lo < hi else (0, 0)


def keep_block(mode: int, rows: torch.Tensor, cols: torch.Tensor, aq: int, akv: int, pre: int, nxt: int,
               mask_block: torch.Tensor | None) -> torch.Tensor:
    """Bool [R, C]: True where row `rows[r]` attends column `cols[c]`.

    `mask_block` is the user mask (modes 0/1) for exactly these rows/columns, or None.
    """
    rows, cols = rows[:, None], cols[None, :]
    keep = (rows < aq) & (cols < akv)
    if mode in (0, 1) and mask_block is not None:
        keep &= mask_block == 0
    lo, hi = band_offsets(mode, mask_block is not None, aq, akv, pre, nxt)
    return keep & (cols >= rows + lo) & (cols <= rows + hi)


def batch_mask(atten_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The 2-D [>=S1, >=S2] user mask of one batch (a mask with leading dim 1 is shared by all batches)."""
    if atten_mask is None:
        return None
    if atten_mask.dim() == 4:
        atten_mask = atten_mask[:, 0]
    if atten_mask.dim() == 3:
        atten_mask = atten_mask[batch if atten_mask.shape[0] > 1 else 0]
    return atten_mask

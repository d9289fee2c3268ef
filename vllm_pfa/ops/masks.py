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


def key_range(mode: int, has_mask: bool, row_start: int, row_end: int, aq: int, akv: int, pre: int,
              nxt: int) -> tuple[int, int]:
    """[lo, hi) bounding the kept columns of rows [row_start, row_end); rows past aq keep nothing."""
    row_end = min(row_end, aq)
    if row_start >= row_end:
        return 0, 0
    d = akv - aq
    lo, hi = 0, akv
    if mode == 0 and has_mask:  # the pre/next band applies only together with a mask
        lo, hi = row_start - pre, row_end - 1 + nxt + 1
    elif mode == 2:
        hi = row_end
    elif mode == 3:
        hi = row_end + d
    elif mode == 4:
        lo, hi = row_start + d - pre, row_end - 1 + d + nxt + 1
    lo, hi = max(lo, 0), min(hi, akv)
    return (lo, hi) if lo < hi else (0, 0)


def keep_block(mode: int, rows: torch.Tensor, cols: torch.Tensor, aq: int, akv: int, pre: int, nxt: int,
               mask_block: torch.Tensor | None) -> torch.Tensor:
    """Bool [R, C]: True where row `rows[r]` attends column `cols[c]`.

    `mask_block` is the user mask (modes 0/1) for exactly these rows/columns, or None.
    """
    # |pre|, |next| beyond any sequence length mean "unbounded"; clamping keeps int64 arithmetic from overflowing.
    pre, nxt = max(min(pre, _UNBOUNDED), -_UNBOUNDED), max(min(nxt, _UNBOUNDED), -_UNBOUNDED)
    rows, cols = rows[:, None], cols[None, :]
    keep = (rows < aq) & (cols < akv)
    d = akv - aq
    if mode in (0, 1) and mask_block is not None:
        keep &= mask_block == 0
        if mode == 0:
            keep &= (cols >= rows - pre) & (cols <= rows + nxt)
    elif mode == 2:
        keep &= cols <= rows
    elif mode == 3:
        keep &= cols <= rows + d
    elif mode == 4:
        keep &= (cols >= rows + d - pre) & (cols <= rows + d + nxt)
    return keep


def batch_mask(atten_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The 2-D [>=S1, >=S2] user mask of one batch (a mask with leading dim 1 is shared by all batches)."""
    if atten_mask is None:
        return None
    if atten_mask.dim() == 4:
        atten_mask = atten_mask[:, 0]
    if atten_mask.dim() == 3:
        atten_mask = atten_mask[batch if atten_mask.shape[0] > 1 else 0]
    return atten_mask

"""Input layouts of PFA and their conversion to the BNSD view the implementations compute in."""

import torch

LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")


def to_bnsd(tensor: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A [B, N, S, D] view of a query/key/value given in `layout` (no copy), its D axis at stride 1."""
    if layout == "BSH":
        batch, seq, hidden = tensor.shape
        tensor = tensor.view(batch, seq, heads, hidden // heads).transpose(1, 2)
    elif layout == "BSND":
        tensor = tensor.transpose(1, 2)
    # torch calls a tensor contiguous whatever the strides of its size-1 axes, so a D = 1 input may have any last
    # stride; kernels read rows of D elements at stride 1, and with one element the stride is free to set.
    if tensor.shape[-1] == 1 and tensor.stride(-1) != 1:
        tensor = tensor.as_strided(tensor.shape, (*tensor.stride()[:-1], 1), tensor.storage_offset())
    return tensor


def rows_at_unit_stride(tensor: torch.Tensor) -> bool:
    """Whether the last axis reads as rows at stride 1, as the native kernel reads D (a one-element axis may carry any
    stride: torch leaves size-1 strides free)."""
    return tensor.dim() == 0 or tensor.shape[-1] <= 1 or tensor.stride(-1) == 1


def from_bnsd(out: torch.Tensor, layout: str) -> torch.Tensor:
    """The [B, N, S, D] result in the output layout of `layout` (contiguous)."""
    if layout == "BNSD":
        return out.contiguous()
    bsnd = out.transpose(1, 2).contiguous()
    if layout == "BSH":
        return bsnd.flatten(2)
    return bsnd  # BSND, and BNSD_BSND's output


def output_shape(query_shape: torch.Size, layout: str) -> tuple[int, ...]:
    if layout == "BNSD_BSND":
        batch, heads, seq, dim = query_shape
        return (batch, seq, heads, dim)
    return tuple(query_shape)


def dims(shape: torch.Size, layout: str, heads: int) -> tuple[int, int, int, int]:
    """(B, N, S, D) of a query/key/value shape; for BSH, N is given by `heads`."""
    if layout == "BSH":
        batch, seq, hidden = shape
        return batch, heads, seq, hidden // heads
    if layout == "BSND":
        batch, seq, n, dim = shape
        return batch, n, seq, dim
    batch, n, seq, dim = shape
    return batch, n, seq, dim

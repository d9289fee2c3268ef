"""Input layouts of PFA and their conversion to the BNSD view the implementations compute in."""

import torch

LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")


def to_bnsd(tensor: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A [B, N, S, D] view of a query/key/value given in `layout` (no copy)."""
    if layout == "BSH":
        batch, seq, hidden = tensor.shape
        return tensor.view(batch, seq, heads, hidden // heads).transpose(1, 2)
    if layout == "BSND":
        return tensor.transpose(1, 2)
    return tensor  # BNSD and BNSD_BSND take BNSD in


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

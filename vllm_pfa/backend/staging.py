"""Persistent buffers for PFA's packed query and K/V, shared by every layer and step of both platforms (a stream, or
the CPU, runs the layers in order, so one buffer of a name serves them all).

A fresh multi-MB tensor per layer costs, on CPU, a page fault per 4 KiB (measured: about a third of the pack/gather
time of a 512-token chunk), and on an NPU memory the profile run never saw. A buffer only grows: on CPU lazily, to
the largest step seen; the Ascend adapter reserves its worst case when the first PFA layer is built (`reserve`), so
vllm-ascend's profile run measures it and sizes the KV cache around it. Padding positions are left as they are: the
CPU implementation never reads past actual_seq_lengths(_kv), and the Ascend adapter fills them itself.
"""

import math

import torch


class StagingBuffers:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def reserve(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer `name` of at least `numel` elements (a larger one than held replaces it)."""
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer

    def reserved_bytes(self, device: torch.device | None = None) -> int:
        return sum(b.numel() * b.element_size() for (_, _, d), b in self._buffers.items()
                   if device is None or d == device)

    def view(self, name: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """A `shape` view of the buffer `name` with `like`'s dtype and device (contents undefined)."""
        numel = math.prod(shape)
        return self.reserve(name, numel, like.dtype, like.device)[:numel].view(shape)


STAGING = StagingBuffers()

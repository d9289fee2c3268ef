"""The operator's large outputs on pages mapped for them (`native_kernel.FRESH_PAGES_OUTPUT_BYTES`,
`_C.padded_output`): zeros until written, so rows past actual_seq_lengths need no fill and their pages are never
touched; the rows the kernel writes faulted in before it starts."""

import ctypes
import os
import platform

import pytest
import torch

from vllm_pfa.ops import compressed_causal_mask, native_kernel, npu_prompt_flash_attention

pytestmark = pytest.mark.skipif(not native_kernel.available(),
                                reason="the native kernel needs an AVX-512 CPU and a built _C")

MIB = 1 << 20
# padded_output faults the rows in with MADV_POPULATE_WRITE (Linux 5.14); older kernels leave them to the first write
POPULATES = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit()) >= (5, 14)
needs_populate = pytest.mark.skipif(not POPULATES, reason=f"Linux {platform.release()} has no MADV_POPULATE_WRITE")


def _resident_bytes(address: int, size: int) -> int:
    """Bytes of the whole pages in [address, address + size) that are in memory (mincore)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-address // page) * page, (address + size) // page * page
    if end <= start:
        return 0
    pages = (ctypes.c_ubyte * ((end - start) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), pages) == 0, ctypes.get_errno()
    return sum(flag & 1 for flag in pages) * page


def _output(lengths, seq_axis=1, seq=2048, heads=32, dim=128, dtype=torch.bfloat16):
    sizes = [len(lengths), seq, heads, dim] if seq_axis == 1 else [len(lengths), heads, seq, dim]
    return native_kernel.extension().padded_output(sizes, dtype, seq_axis, lengths)


@needs_populate
@pytest.mark.parametrize("seq_axis", [1, 2], ids=["BSND", "BNSD"])
def test_written_rows_are_resident_and_the_padding_untouched(seq_axis):
    """64 MiB, batch 0's 16 MiB of rows below its length: in memory before anything writes them (populated), the
    other batches' rows not (never faulted), and all of it reads as zeros."""
    out = _output([2048, 0, 0, 0], seq_axis)
    batch = out.nbytes // 4
    assert _resident_bytes(out.data_ptr(), batch) == batch
    # where Linux backs anonymous memory with huge pages anyway (THP "always"), one faulted for batch 0's last rows
    # may reach up to 2 MiB past them
    assert _resident_bytes(out.data_ptr() + batch + 2 * MIB, 3 * batch - 2 * MIB) == 0
    assert out.is_contiguous() and out.dtype == torch.bfloat16 and out.nbytes == 64 * MIB
    assert not bool(out.any())


@pytest.mark.parametrize("lengths, sizes, seq_axis", [
    ([5, -3, 99], [3, 7, 2, 3], 1),  # lengths past the axis and below 0: clamped
    ([0, 0], [2, 3, 4, 5], 2),
    ([1], [1, 0, 2, 3], 1),  # zero-size axes: no memory
    ([4], [1, 4, 2, 0], 2),
    ([], [0, 4, 2, 8], 1),
], ids=["clamped", "nothing_written", "no_rows", "no_dim", "no_batch"])
def test_any_sizes_and_lengths(lengths, sizes, seq_axis):
    out = native_kernel.extension().padded_output(sizes, torch.float32, seq_axis, lengths)
    assert list(out.shape) == sizes and out.is_contiguous()
    assert not bool(out.any())
    out.fill_(2.0)
    assert bool((out == 2.0).all())


def test_malformed_requests_are_refused():
    padded_output = native_kernel.extension().padded_output
    for args in (([2, 3, 4], 1, [1, 1]), ([2, 3, 4, 5], 3, [1, 1]), ([2, 3, 4, 5], 1, [1])):
        with pytest.raises(RuntimeError, match="padded_output"):
            padded_output(args[0], torch.float32, *args[1:])


def test_the_output_resizes_keeping_its_values():
    out = native_kernel.extension().padded_output([1, 3, 2, 4], torch.float32, 1, [3])
    out.copy_(torch.arange(24.0).view(1, 3, 2, 4))
    out.resize_(40 * MIB // 4)
    assert torch.equal(out[:24], torch.arange(24.0))


@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH"])
def test_large_outputs_take_fresh_pages_and_are_exact(monkeypatch, layout):
    """A padded batch whose output passes the threshold: its last batch (length 0) is never touched, as on
    padded_output's pages, where below the threshold its zeros are written; both give the same rows."""
    gen = torch.Generator().manual_seed(0)
    lens = [300, 17, 0]
    q, k, v = (torch.randn(3, 300, heads, 64, generator=gen).bfloat16() for heads in (8, 2, 2))
    if layout == "BNSD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    elif layout == "BSH":
        q, k, v = (t.flatten(2) for t in (q, k, v))
    kwargs = dict(num_heads=8, num_key_value_heads=2, input_layout=layout, scale_value=0.125, sparse_mode=3,
                  atten_mask=compressed_causal_mask(), actual_seq_lengths=lens)

    def last_batch_resident(out):
        return _resident_bytes(out[2].data_ptr(), out[2].nbytes)

    monkeypatch.setattr(native_kernel, "FRESH_PAGES_OUTPUT_BYTES", 1 << 60)
    filled = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert last_batch_resident(filled) > filled[2].nbytes // 2
    monkeypatch.setattr(native_kernel, "FRESH_PAGES_OUTPUT_BYTES", filled.nbytes)
    fresh = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert last_batch_resident(fresh) == 0
    assert torch.equal(fresh, filled)
    rows_past = filled[1, :, 17:] if layout == "BNSD" else filled[1, 17:]
    assert not bool(rows_past.any()) and not bool(filled[2].any())

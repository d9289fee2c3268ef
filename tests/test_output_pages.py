"""The operator's large outputs on huge pages (`native_kernel.HUGE_PAGE_OUTPUT_BYTES`): each call maps such an output
afresh, and on 4 KiB pages its first write took a fault per page."""

from pathlib import Path

import pytest
import torch

from vllm_pfa.ops import compressed_causal_mask, native_kernel, npu_prompt_flash_attention

pytestmark = pytest.mark.skipif(not native_kernel.available(),
                                reason="the native kernel needs an AVX-512 CPU and a built _C")

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_bytes_within(start: int, size: int) -> int:
    """AnonHugePages (bytes) of this process's mappings that overlap [start, start + size): madvise splits the
    tensor's mapping at the huge pages' bounds."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo < start + size and start < hi
        elif inside and first == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="Linux's transparent huge pages are off or absent here")
def test_a_large_fresh_tensor_gets_huge_pages():
    out = torch.empty(64 << 20, dtype=torch.uint8)
    native_kernel.extension().advise_huge_pages(out)
    out.fill_(1)
    assert _huge_bytes_within(out.data_ptr(), out.nbytes) >= 32 << 20


@pytest.mark.parametrize("tensor", [torch.empty(0), torch.empty(3, 5)[:, 1:], torch.empty(10, 1 << 20)[::3].t(),
                                    torch.empty(1, dtype=torch.bfloat16)], ids=["empty", "small", "strided", "one"])
def test_advice_takes_any_cpu_tensor(tensor):
    native_kernel.extension().advise_huge_pages(tensor)


def test_large_outputs_are_advised_and_exact(monkeypatch):
    """A padded batch whose output passes the threshold: the advice is asked for it, and its rows are the kernel's
    (rows past a batch's length 0), as without the advice."""
    gen = torch.Generator().manual_seed(0)
    lens = [300, 17]
    q, k, v = (torch.randn(2, 300, heads, 64, generator=gen).bfloat16() for heads in (8, 2, 2))
    kwargs = dict(num_heads=8, num_key_value_heads=2, input_layout="BSND", scale_value=0.125, sparse_mode=3,
                  atten_mask=compressed_causal_mask(), actual_seq_lengths=lens)
    monkeypatch.setattr(native_kernel, "HUGE_PAGE_OUTPUT_BYTES", 1 << 60)
    plain = npu_prompt_flash_attention(q, k, v, **kwargs)
    advised = []
    extension = native_kernel.extension()

    class Spy:
        def __getattr__(self, name):
            return getattr(extension, name)

        def advise_huge_pages(self, tensor):
            advised.append(tensor.nbytes)
            extension.advise_huge_pages(tensor)

    monkeypatch.setattr(native_kernel, "HUGE_PAGE_OUTPUT_BYTES", plain.nbytes)
    monkeypatch.setattr(native_kernel, "extension", lambda: Spy())
    assert torch.equal(npu_prompt_flash_attention(q, k, v, **kwargs), plain)
    assert advised == [plain.nbytes]
    assert bool((plain[1, 17:] == 0).all())

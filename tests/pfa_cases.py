"""Shared generators of PFA problems for the operator tests (hypothesis strategies and tensor builders), and a
counter of the aten ops a call runs."""

import contextlib
import math

import torch
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_pfa.check_operator import make_qkv  # noqa: F401  (the package's builder, shared with the check)
from vllm_pfa.ops import compressed_causal_mask, native_kernel

LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")


@contextlib.contextmanager
def counting_native_runs(calls: list | None = None, products: str | None = None):
    """Yields a list that gets one entry per native kernel run inside the block (`calls` if given); `products`, if
    given, forces how those runs multiply (`native_kernel.run`'s argument: "fp32", "input_dtype_emulated", ...)."""
    calls = [] if calls is None else calls
    run = native_kernel.run
    forced = {} if products is None else {"products": products}
    native_kernel.run = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs, **forced)
    try:
        yield calls
    finally:
        native_kernel.run = run


def has_matrix_instructions(dtype: torch.dtype) -> bool:
    """Whether the native kernel multiplies `dtype` on this CPU's 16-bit matrix instructions (False where the kernel
    is not available: this runs while tests are collected)."""
    return native_kernel.available() and native_kernel.extension().products_for(torch.zeros(1, dtype=dtype)) == \
        "input_dtype"


@st.composite
def problems(draw, dtypes=(torch.float32,), head_dims=(8, 16), max_seq=24):
    """Keyword arguments of one random PFA call, plus the tensors."""
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from((1, 2)))
    heads = kv_heads * draw(st.sampled_from((1, 2, 4)))
    dim = draw(st.sampled_from(head_dims))
    q_seq = draw(st.integers(1, max_seq))
    kv_seq = draw(st.integers(1, max_seq))
    mode = draw(st.sampled_from((0, 0, 1, 2, 3, 3, 4)))
    q, k, v = make_qkv(layout, batch, heads, kv_heads, q_seq, kv_seq, dim, dtype, seed=draw(st.integers(0, 99)))
    kwargs = dict(num_heads=heads, num_key_value_heads=draw(st.sampled_from((0, kv_heads))) if kv_heads == heads
                  else kv_heads, input_layout=layout, scale_value=1 / math.sqrt(dim), sparse_mode=mode)
    if draw(st.booleans()):
        kwargs["actual_seq_lengths"] = draw(st.lists(st.integers(0, q_seq), min_size=1, max_size=batch + 1)
                                            .filter(lambda x: len(x) == 1 or len(x) >= batch))
    if draw(st.booleans()):
        kwargs["actual_seq_lengths_kv"] = draw(st.lists(st.integers(0, kv_seq), min_size=1, max_size=batch + 1)
                                               .filter(lambda x: len(x) == 1 or len(x) >= batch))
    if mode in (2, 3, 4):
        kwargs["atten_mask"] = compressed_causal_mask() if draw(st.booleans()) else \
            compressed_causal_mask().bool().view(1, 1, 2048, 2048)
    elif mode == 1 or draw(st.booleans()):
        mask_batch = draw(st.sampled_from((None, 1, batch)))
        shape = (q_seq, kv_seq) if mask_batch is None else (mask_batch, q_seq, kv_seq)
        if mask_batch is not None and draw(st.booleans()):
            shape = (mask_batch, 1, q_seq, kv_seq + draw(st.integers(0, 3)))  # padded key axis
        mask_dtype = draw(st.sampled_from((torch.bool, torch.int8, torch.uint8)))
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.3
        kwargs["atten_mask"] = mask.to(mask_dtype)
    if mode in (0, 4):
        kwargs["pre_tokens"] = draw(st.sampled_from((2147483647, 65535, 0, 3, 7, -2)))
        kwargs["next_tokens"] = draw(st.sampled_from((0, 0, 2, 65535, -1)))
    if draw(st.integers(0, 3)) == 0:
        pse_dtype = torch.float16 if dtype == torch.int8 else dtype
        pse_batch = draw(st.sampled_from((1, batch)))
        kwargs["pse_shift"] = torch.randn(pse_batch, heads, q_seq + draw(st.integers(0, 2)),
                                          kv_seq + draw(st.integers(0, 2))).to(pse_dtype)
    return q, k, v, kwargs


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> dict[str, int]:
    """The aten ops `fn()` runs, with how often each ran."""
    with _OpCounter() as mode:
        fn()
    return mode.counts

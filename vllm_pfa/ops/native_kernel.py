"""PFA problems for the package's native CPU prefill kernel (`vllm_pfa/csrc/prefill_attention.cpp`).

The kernel is a flash-attention loop over dense K/V, so PFA's inputs need no repaging: its matrix products run in
the 16-bit input dtype where this CPU has instructions for it (bf16: the kernel's own AMX or AVX512-BF16 tiles; fp16:
oneDNN's brgemm on AMX-FP16), else in fp32 (AVX-512 FMA); the softmax is fp32 either way (`_C.products_for` says
which, `_C.products_route` how). It computes
every float problem whose kept keys form a band: query row i (< aq) keeps keys j in [i + lo, i + hi] within
[0, akv), which covers
- mode 0 without a mask: everything (pre/next_tokens apply only together with a mask);
- mode 2: j <= i; mode 3: j <= i + (akv - aq);
- mode 4: i + (akv - aq) - pre_tokens <= j <= i + (akv - aq) + next_tokens.
Rows with no key, and rows past aq, are 0, as in PFA. Masks of modes 0/1 and pse_shift are left to the other paths.
"""

import functools
from dataclasses import dataclass

import torch

from vllm_pfa.log import init_logger
from vllm_pfa.ops.layout import rows_at_unit_stride, to_bnsd
from vllm_pfa.ops.masks import band_offsets
from vllm_pfa.ops.validation import FLOAT_DTYPES, PFAProblem, validate

logger = init_logger(__name__)

# Outputs from this size are mapped for the call (`_C.padded_output`): memory that reads as zeros, so rows past
# actual_seq_lengths need no fill and their whole pages are never touched, the rows the kernel writes faulted in
# before it starts: bf16 lengths 2048/1000/517/130 padded to 2048, 64 MiB, 62 -> 48 ms a call (output_memory.cpp).
# Under glibc, PyTorch's own allocation of this size is a fresh mapping too (above malloc's largest mmap threshold,
# 32 MiB); smaller outputs come from reused heap memory, where writing the zeros costs less than new pages.
FRESH_PAGES_OUTPUT_BYTES = 32 << 20

@functools.cache
def extension():
    """The compiled kernel module, or None where it is not built or this CPU lacks AVX-512; which CPU route runs is
    logged once per process."""
    try:
        from vllm_pfa import _C
    except ImportError as exc:
        logger.warning("vllm_pfa native CPU kernel not available (%s); PFA uses the slower CPU paths", exc)
        return None
    if not _C.cpu_supported():
        logger.info("this CPU lacks AVX-512: PFA uses vLLM's CPU kernel or torch instead of the native kernel")
        return None
    logger.info("PFA's CPU path: the native AVX-512 kernel (vllm_pfa._C)")
    return _C


def available() -> bool:
    return extension() is not None


def plan(problem: PFAProblem, dtype: torch.dtype, *, has_pse: bool, has_mask: bool) -> list[tuple[int, int]] | None:
    """Per batch (lo, hi) band offsets, or None when the problem is not a band the kernel computes."""
    p = problem
    if has_pse or dtype not in FLOAT_DTYPES or p.sparse_mode == 1 or (p.sparse_mode == 0 and has_mask):
        return None
    if not available():
        return None
    return [band_offsets(p.sparse_mode, has_mask, aq, akv, p.pre_tokens, p.next_tokens)
            for aq, akv in zip(p.actual_q, p.actual_kv)]


def run(query, key, value, problem: PFAProblem, bands: list[tuple[int, int]], *,
        products: str = "auto") -> torch.Tensor:
    """The op's result; `products` forces one way of multiplying (tests: "fp32", "input_dtype_emulated"). The views,
    the output and the kernel in one native call (`_C.run_operator`): as Python tensor calls they cost ~35 us of a
    0.46 ms call where Python runs out of cache (between other kernels)."""
    p = problem
    return extension().run_operator(query, key, value, p.layout, p.num_heads, p.num_kv_heads, list(p.actual_q),
                                    list(p.actual_kv), [lo for lo, _ in bands], [hi for _, hi in bands],
                                    p.scale_value, products, FRESH_PAGES_OUTPUT_BYTES)


@dataclass(frozen=True)
class DirectCall:
    """A problem the native kernel computes, validated once, for the backend's direct calls: every layer of a step
    with the same geometry runs it on its own tensors (`run_direct`), without validating its arguments again."""

    problem: PFAProblem
    inputs: tuple[tuple[torch.Size, torch.dtype, torch.device], ...]  # query's, key's and value's
    lo: list[int]
    hi: list[int]


def _input_form(tensor: torch.Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return tensor.shape, tensor.dtype, tensor.device


def prepare_direct(query, key, value, **kwargs) -> DirectCall | None:
    """`npu_prompt_flash_attention(query, key, value, **kwargs)` validated (its errors raised) and planned for the
    native kernel, or None where the kernel does not compute it with a BSND query on CPU. Unlike the op, query, key
    and value may be views at any token and head stride (vLLM's q, k, v are views of one fused projection): the
    kernel reads rows of D elements, so only the last axis must have stride 1."""
    from vllm_pfa.ops.api import _PUBLIC_DEFAULTS  # api imports this module (through fast_path)

    problem = validate(query, key, value, **{**_PUBLIC_DEFAULTS, **kwargs}, strided_qkv=True)
    bands = plan(problem, query.dtype, has_pse=kwargs.get("pse_shift") is not None,
                 has_mask=kwargs.get("atten_mask") is not None)
    if bands is None or problem.layout != "BSND" or query.device.type != "cpu" or query.numel() == 0:
        return None
    return DirectCall(problem, tuple(_input_form(t) for t in (query, key, value)), [lo for lo, _ in bands],
                      [hi for _, hi in bands])


def run_direct(call: DirectCall, out: torch.Tensor, out_starts: list[int], query, key, value) -> bool:
    """Runs a prepared call on tensors of the form it was validated with, written straight into vLLM's output rows:
    `out` is [tokens, N, D] and batch b's query row i lands in out[out_starts[b] + i] (rows past
    actual_seq_lengths are not written). Returns False, writing nothing, where the tensors' form or out's dtype
    differ from the prepared call's (then the caller prepares again or runs the op)."""
    p = call.problem
    inputs = (query, key, value)
    if (out.dtype != p.out_dtype or any(_input_form(t) != form for t, form in zip(inputs, call.inputs))
            or not all(rows_at_unit_stride(t) for t in inputs)):
        return False
    q, k, v = (to_bnsd(t, "BSND", heads) for t, heads in
               ((query, p.num_heads), (key, p.num_kv_heads), (value, p.num_kv_heads)))
    extension().prefill_attention(q, k, v, to_bnsd(out.unsqueeze(0), "BSND", p.num_heads), list(p.actual_q),
                                  list(p.actual_kv), call.lo, call.hi, p.scale_value, "auto", list(out_starts))
    return True

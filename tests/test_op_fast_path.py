"""The fast path (native kernel, vLLM CPU kernel and SDPA delegation, blockwise path) against the reference."""

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings

from pfa_cases import make_qkv, problems
from vllm_pfa.check_operator import TOLERANCE  # the dtype tolerances the check uses too
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, reference_npu_prompt_flash_attention
from vllm_pfa.ops import api, fast_path, native_kernel, sdpa_path, vllm_cpu_kernel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _assert_matches_reference(q, k, v, kwargs, actual):
    expected = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@settings(max_examples=120, deadline=None)
@given(problems(dtypes=FLOAT_DTYPES, head_dims=(16, 32, 64), max_seq=40))
def test_fast_path_matches_reference(case):
    q, k, v, kwargs = case
    _assert_matches_reference(q, k, v, kwargs, npu_prompt_flash_attention(q, k, v, **kwargs))


@pytest.fixture
def without_native_kernel(monkeypatch):
    """The routes taken where the native kernel is unavailable (no AVX-512, or not built)."""
    monkeypatch.setattr(native_kernel, "plan", lambda *a, **kw: None)


def _without(module, name, value, call):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        return call()
    finally:
        setattr(module, name, original)


@settings(max_examples=60, deadline=None)
@given(problems(dtypes=FLOAT_DTYPES, head_dims=(32, 64), max_seq=40))
def test_blockwise_path_matches_reference(case):
    q, k, v, kwargs = case
    no_plan = lambda *a, **kw: None  # noqa: E731  (force the blockwise path)
    actual = _without(native_kernel, "plan", no_plan, lambda: _without(
        vllm_cpu_kernel, "plan", no_plan, lambda: npu_prompt_flash_attention(q, k, v, **kwargs)))
    _assert_matches_reference(q, k, v, kwargs, actual)


@settings(max_examples=60, deadline=None)
@given(problems(dtypes=FLOAT_DTYPES, head_dims=(16, 32, 64), max_seq=40))
def test_sdpa_path_matches_reference(case):
    """The SDPA delegation (normally for 4096+ tokens) on small problems: its threshold lowered to 1."""
    q, k, v, kwargs = case
    actual = _without(native_kernel, "plan", lambda *a, **kw: None, lambda: _without(
        sdpa_path, "MIN_SEQ", 1, lambda: npu_prompt_flash_attention(q, k, v, **kwargs)))
    _assert_matches_reference(q, k, v, kwargs, actual)


def _native_eligible(kwargs) -> bool:
    return "pse_shift" not in kwargs and (kwargs["sparse_mode"] in (2, 3, 4) or
                                          (kwargs["sparse_mode"] == 0 and "atten_mask" not in kwargs))


@pytest.mark.skipif(not native_kernel.available(), reason="the native kernel needs an AVX-512 CPU and a built _C")
@settings(max_examples=80, deadline=None)
@given(problems(dtypes=FLOAT_DTYPES, head_dims=(16, 40, 64, 128), max_seq=600))
def test_native_kernel_matches_reference(case):
    """Lengths across the kernel's key blocks (512) and query blocks (96 rows / group), unaligned head dims."""
    q, k, v, kwargs = case
    calls = []
    run = native_kernel.run
    actual = _without(native_kernel, "run", lambda *a: calls.append(1) or run(*a),
                      lambda: npu_prompt_flash_attention(q, k, v, **kwargs))
    assert bool(calls) == _native_eligible(kwargs)
    _assert_matches_reference(q, k, v, kwargs, actual)


@pytest.mark.skipif(not native_kernel.available(), reason="the native kernel needs an AVX-512 CPU and a built _C")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode,extra", [
    (3, {}),
    (2, {}),
    (4, {"pre_tokens": 100, "next_tokens": 0}),
    (4, {"pre_tokens": 300, "next_tokens": 40}),
    (0, {}),
])
def test_native_kernel_covers_prefill_shapes(dtype, mode, extra, monkeypatch):
    """GQA prefill with chunk-like lengths (aq < akv), a batch with one row and one with more rows than keys."""
    _assert_route_exact(native_kernel, monkeypatch, dtype, mode, extra, 128, [300, 129, 1, 200], [600, 256, 513, 100])


@pytest.mark.skipif(not native_kernel.available(), reason="the native kernel needs an AVX-512 CPU and a built _C")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernel_work_split_is_exact(threads):
    """2 batches x 2 kv heads = 4 units: whole units per thread (1 and 2 threads), shared query blocks (3)."""
    q, k, v = make_qkv("BSND", 2, 8, 2, 200, 300, 64, torch.bfloat16)
    kwargs = _causal_kwargs(8, 2, 64, actual_seq_lengths=[200, 37], actual_seq_lengths_kv=[300, 37])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = npu_prompt_flash_attention(q, k, v, **kwargs)
    finally:
        torch.set_num_threads(before)
    _assert_matches_reference(q, k, v, kwargs, out)


@pytest.mark.skipif(not native_kernel.available(), reason="the native kernel needs an AVX-512 CPU and a built _C")
def test_native_kernel_rejects_inconsistent_arguments():
    """The binding checks what it is given: an error, never a crash or a write out of bounds."""
    from vllm_pfa import _C

    q = torch.zeros(1, 2, 4, 16)
    good = dict(q_lens=[4], kv_lens=[4], lo_offsets=[-8], hi_offsets=[0], scale=1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        _C.prefill_attention(q, q.half(), q, torch.empty_like(q), **good)
    with pytest.raises(RuntimeError, match="out of range"):
        _C.prefill_attention(q, q, q, torch.empty_like(q), **dict(good, kv_lens=[5]))
    with pytest.raises(RuntimeError, match="contiguous D"):
        _C.prefill_attention(torch.zeros(1, 2, 16, 4).transpose(2, 3), q, q, torch.empty_like(q), **good)
    with pytest.raises(RuntimeError, match="one q_len"):
        _C.prefill_attention(q, q, q, torch.empty_like(q), **dict(good, q_lens=[4, 4]))


def test_native_kernel_available_on_avx512_cpus():
    """Where the CPU has AVX-512 the native kernel must load, or the fast path silently falls back."""
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    if not all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        pytest.skip("this CPU lacks AVX-512: the fallback routes are what runs here")
    if os.environ.get("VLLM_PFA_BUILD_NATIVE") == "0":
        pytest.skip("installed without the native extension (VLLM_PFA_BUILD_NATIVE=0): the fallback routes run")
    assert native_kernel.available()


def test_long_square_causal_prefill_goes_to_sdpa(without_native_kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(sdpa_path, "run", lambda *a, _run=sdpa_path.run: calls.append(1) or _run(*a))
    q, k, v = make_qkv("BSND", 2, 2, 1, 4096, 4096, 128, torch.bfloat16)
    kwargs = _causal_kwargs(2, 1, 128, actual_seq_lengths=[4096, 1000], actual_seq_lengths_kv=[4096, 1000])
    out = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert calls
    _assert_matches_reference(q, k, v, kwargs, out)
    kwargs["actual_seq_lengths_kv"] = [4096, 1200]  # not square: bottom-right alignment is not SDPA's
    npu_prompt_flash_attention(q, k, v, **kwargs)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [-0.125, 0.0, math.inf])
def test_scales_sdpa_gets_wrong_stay_off_it(without_native_kernel, monkeypatch, dtype, scale):
    """torch's CPU SDPA with is_causal returns NaN or wrong rows for a scale <= 0, and with an infinite scale values
    where the reference gives NaN: such problems take another route and match the reference (NaN where it has NaN);
    unmasked ones with a finite scale, which SDPA gets right, still go to it."""
    calls = []
    monkeypatch.setattr(sdpa_path, "MIN_SEQ", 1)
    monkeypatch.setattr(sdpa_path, "run", lambda *a, _run=sdpa_path.run: calls.append(1) or _run(*a))
    q, k, v = make_qkv("BSND", 1, 4, 2, 40, 40, 64, dtype)
    for mode in (3, 0):
        kwargs = dict(_causal_kwargs(4, 2, 64), scale_value=scale, sparse_mode=mode)
        if mode == 0:
            kwargs["atten_mask"] = None
        actual = npu_prompt_flash_attention(q, k, v, **kwargs).float()
        expected = reference_npu_prompt_flash_attention(q, k, v, **kwargs).float()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=True)
        assert len(calls) == (mode == 0 and math.isfinite(scale)), (mode, calls)


def _assert_route_exact(route, monkeypatch, dtype, mode, extra, dim, q_lens, kv_lens):
    """A GQA (8/2) problem of `mode` goes through `route` (a module with `run`) and matches the reference."""
    calls = []
    monkeypatch.setattr(route, "run", lambda *a, _run=route.run: calls.append(1) or _run(*a))
    q, k, v = make_qkv("BSND", len(q_lens), 8, 2, max(q_lens), max(kv_lens), dim, dtype)
    kwargs = _causal_kwargs(8, 2, dim, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens, **extra)
    kwargs["sparse_mode"] = mode
    if mode == 0:
        kwargs.pop("atten_mask")
    out = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert calls, f"expected {route.__name__}"
    _assert_matches_reference(q, k, v, kwargs, out)


def _causal_kwargs(heads, kv_heads, dim, **extra):
    return dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout="BSND", scale_value=1 / math.sqrt(dim),
                sparse_mode=3, atten_mask=compressed_causal_mask(), **extra)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode,extra", [
    (3, {}),
    (2, {}),
    (4, {"pre_tokens": 100, "next_tokens": 0}),
    (0, {}),
])
def test_kernel_delegation_covers_causal_shapes(dtype, mode, extra, without_native_kernel, monkeypatch):
    """The common prefill shapes take the vLLM CPU kernel and stay exact; block-boundary lengths included."""
    _assert_route_exact(vllm_cpu_kernel, monkeypatch, dtype, mode, extra, 64, [300, 129, 1], [520, 256, 128])


def test_long_prompt_runs_in_bounded_memory():
    """16K tokens causal: nothing S1 x S2 is built (an fp32 16K x 16K x 8-head score tensor would be 8 GiB)."""
    import resource

    q, k, v = make_qkv("BSND", 1, 8, 2, 16384, 16384, 64, torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = npu_prompt_flash_attention(q, k, v, **_causal_kwargs(8, 2, 64))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out.shape == q.shape and bool(torch.isfinite(out.float()).all())
    assert grown_mib < 1024, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_blockwise_long_masked_rows_bounded():
    """The blockwise path sizes its row blocks so one block's scores stay within the budget."""
    assert fast_path._block_rows(32, 16384) * 32 * 16384 <= fast_path.SCORE_BUDGET
    assert fast_path._block_rows(1, 8) == fast_path.MAX_BLOCK_ROWS


def test_int8_and_quantized_output_go_to_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "reference_prompt_flash_attention",
                        lambda *a, _ref=api.reference_prompt_flash_attention, **kw: calls.append(1) or _ref(*a, **kw))
    q, k, v = make_qkv("BSND", 1, 2, 2, 4, 4, 32, torch.bfloat16)
    npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND")
    assert not calls  # float in, float out: the fast path
    npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND", quant_scale2=torch.ones(1))
    assert len(calls) == 1  # int8 output: the reference


def test_spec_example():
    q = torch.randn(1, 8, 164, 128, dtype=torch.float16)
    k = torch.randn(1, 8, 1024, 128, dtype=torch.float16)
    v = torch.randn(1, 8, 1024, 128, dtype=torch.float16)
    kwargs = dict(actual_seq_lengths=[164], actual_seq_lengths_kv=[1024], num_heads=8, input_layout="BNSD",
                  scale_value=1 / math.sqrt(128.0), pre_tokens=65535, next_tokens=65535)
    out = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert out.shape == torch.Size([1, 8, 164, 128]) and out.dtype == torch.float16
    _assert_matches_reference(q, k, v, kwargs, out)


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_empty_query_gives_empty_output(layout):
    q, k, v = make_qkv(layout, 1, 2, 2, 0, 5, 16, torch.float16)
    out = npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout=layout)
    assert out.numel() == 0 and out.dtype == torch.float16


@pytest.mark.parametrize("layout", ["BSH", "BNSD_BSND"])
def test_empty_key_value_gives_zeros(layout):
    q, k, v = make_qkv(layout, 2, 2, 2, 4, 0, 16, torch.bfloat16)
    out = npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout=layout)
    expected_shape = (2, 4, 32) if layout == "BSH" else (2, 4, 2, 16)
    assert out.shape == expected_shape and not out.any()


def test_padding_mask_is_ignored():
    q, k, v = make_qkv("BSH", 1, 2, 2, 4, 6, 16, torch.float32)
    base = npu_prompt_flash_attention(q, k, v, num_heads=2)
    with_padding = npu_prompt_flash_attention(q, k, v, num_heads=2, padding_mask=torch.ones(1, 4, 6))
    torch.testing.assert_close(base, with_padding)


def test_actual_lengths_accept_tensors():
    q, k, v = make_qkv("BSND", 2, 2, 2, 5, 7, 16, torch.float32)
    kw = dict(num_heads=2, input_layout="BSND")
    as_list = npu_prompt_flash_attention(q, k, v, actual_seq_lengths=[3, 5], actual_seq_lengths_kv=[7], **kw)
    as_tensor = npu_prompt_flash_attention(q, k, v, actual_seq_lengths=torch.tensor([3, 5]),
                                           actual_seq_lengths_kv=torch.tensor([7]), **kw)
    torch.testing.assert_close(as_list, as_tensor)
    assert not as_list[0, 3:].any()  # rows past the actual length are 0


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_padding_past_actual_lengths_is_never_read(mode, implementation):
    """Rows past actual_seq_lengths(_kv) may hold anything (the backend leaves them uninitialized): even NaN."""
    q, k, v = make_qkv("BSND", 2, 4, 2, 12, 20, 64, torch.float32)
    kwargs = _causal_kwargs(4, 2, 64, actual_seq_lengths=[12, 5], actual_seq_lengths_kv=[20, 9])
    kwargs["sparse_mode"] = mode
    if mode == 0:
        kwargs.pop("atten_mask")
    call = npu_prompt_flash_attention if implementation == "fast" else reference_npu_prompt_flash_attention
    clean = call(q, k, v, **kwargs)
    q[1, 5:], k[1, 9:], v[1, 9:] = float("nan"), float("nan"), float("nan")
    poisoned = call(q, k, v, **kwargs)
    assert not poisoned.isnan().any()
    torch.testing.assert_close(poisoned, clean)


def _d1_unit_free_stride(layout, batch, heads, seq, gen):
    """A D = 1 tensor that torch calls contiguous although its last stride is not 1 (size-1 strides are free)."""
    if layout == "BSH":  # H = N * D = 1
        return torch.randn(batch, 1, seq, generator=gen).transpose(1, 2)
    if layout == "BSND":
        return torch.randn(batch, seq, 1, heads, generator=gen).transpose(2, 3)
    return torch.randn(batch, heads, 1, seq, generator=gen).transpose(2, 3)


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_1_with_free_last_stride(layout, mode, dtype):
    """Every route (the native kernel reads D-element rows at stride 1) and the reference compute such tensors."""
    from test_op_reference import brute_force

    gen = torch.Generator().manual_seed(0)
    heads = 1 if layout == "BSH" else 2
    q, k, v = (_d1_unit_free_stride(layout, 2, heads, seq, gen).to(dtype) for seq in (40, 48, 48))
    assert q.is_contiguous() and q.stride(-1) != 1
    kwargs = dict(num_heads=heads, input_layout=layout, scale_value=0.5, sparse_mode=mode,
                  actual_seq_lengths=[40, 17], actual_seq_lengths_kv=[48, 30])
    if mode == 3:
        kwargs["atten_mask"] = compressed_causal_mask()
    expected = brute_force(q, k, v, **kwargs)
    reference = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(reference.double(), expected, atol=tol, rtol=tol)
    _assert_matches_reference(q, k, v, kwargs, npu_prompt_flash_attention(q, k, v, **kwargs))

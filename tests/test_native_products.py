"""The native kernel's 16-bit matrix products (where the CPU has bf16/fp16 matrix instructions: oneDNN's brgemm, or for
bf16 the kernel's own AMX tiles on a CPU with AMX-BF16 and its own VDPBF16PS register tiles on a CPU with AVX512-BF16
and no AMX, which "input_dtype" picks there and "input_dtype_onednn" leaves out; an AVX-512F emulation of them on any
AVX-512 CPU) and its in-place output for the backend."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pfa_cases import counting_native_runs, has_matrix_instructions, problems
from test_op_fast_path import TOLERANCE, _assert_matches_reference, _native_eligible
from vllm_pfa.check_env import cpu_info
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, native_kernel

pytestmark = pytest.mark.skipif(not native_kernel.available(),
                                reason="the native kernel needs an AVX-512 CPU and a built _C")

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# The products on the instructions, where the CPU has them: the implementation "input_dtype" picks, and oneDNN's
# (each followed by the test's other parameters, if any).
def _hardware_bf16_params(*more):
    skip = pytest.mark.skipif(not has_matrix_instructions(torch.bfloat16), reason="no bf16 matrix instructions here")
    return [pytest.param("input_dtype", *more, marks=skip, id="hardware_bf16"),
            pytest.param("input_dtype_onednn", *more, marks=skip, id="hardware_bf16_onednn")]


def _op_with_products(products, q, k, v, kwargs):
    with counting_native_runs(products=products) as calls:
        out = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert calls, "the native kernel did not run"
    return out


@pytest.mark.parametrize("products,dtypes", [
    pytest.param("input_dtype_emulated", SIXTEEN_BIT, id="emulated"),
    *_hardware_bf16_params((torch.bfloat16,)),
])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_16bit_products_match_reference(products, dtypes, data):
    """The 16-bit path (VNNI packing, block-wide products, P rounded to the input dtype), emulated with AVX-512F on
    every AVX-512 CPU (P rounded by AVX-512F code) and on the instructions where the CPU has them (P rounded by
    AVX512-BF16's conversion), within the reference tests' tolerances."""
    q, k, v, kwargs = data.draw(problems(dtypes=dtypes, head_dims=(16, 40, 64, 128), max_seq=600))
    if not _native_eligible(kwargs):
        return
    actual = _op_with_products(products, q, k, v, kwargs)
    _assert_matches_reference(q, k, v, kwargs, actual)


@pytest.mark.parametrize("products", _hardware_bf16_params())
def test_emulation_agrees_with_the_instructions(products):
    """Exact products, fp32 sums: the two differ only in the order of the sums (and so in rounding); P is rounded by
    AVX512-BF16's conversion in one and by AVX-512F code in the other, to the same values."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 700, 8, 128, generator=gen).bfloat16() for _ in range(3))
    kwargs = dict(num_heads=8, input_layout="BSND", scale_value=128 ** -0.5, sparse_mode=3,
                  atten_mask=compressed_causal_mask(), actual_seq_lengths=[700, 333])
    hardware = _op_with_products(products, q, k, v, kwargs)
    emulated = _op_with_products("input_dtype_emulated", q, k, v, kwargs)
    torch.testing.assert_close(hardware.float(), emulated.float(), atol=8e-3, rtol=8e-3)


@pytest.mark.parametrize("products", ["input_dtype_emulated", *_hardware_bf16_params()])
@pytest.mark.parametrize("mode,extra", [(3, {}), (4, {"pre_tokens": 40, "next_tokens": 0})], ids=["causal", "window"])
def test_diagonal_chunks_match_reference(products, mode, extra):
    """MHA query blocks on a band's diagonal run their 16-bit products in chunks of positions, each over its own
    columns; a sliding window leaves some chunks with no key in a block. Long enough for several blocks of each."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 600, 4, 64, generator=gen).bfloat16() for _ in range(3))
    kwargs = dict(num_heads=4, input_layout="BSND", scale_value=64 ** -0.5, sparse_mode=mode,
                  atten_mask=compressed_causal_mask(), actual_seq_lengths=[600, 301],
                  actual_seq_lengths_kv=[600, 301], **extra)
    actual = _op_with_products(products, q, k, v, kwargs)
    _assert_matches_reference(q, k, v, kwargs, actual)


@pytest.mark.parametrize("products", ["input_dtype_emulated", *_hardware_bf16_params()])
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_query_rows_read_in_place(products, head_dim, kv_heads):
    """Query rows go to the 16-bit products in place where the head dim needs no padding (one call per query head
    of a kv head's group: its positions at one stride), copied where it does (40). The kernel takes any row stride:
    here Q, K and V are column slices of one fused projection output, so a row's stride is wider than Q's own. MHA,
    GQA 4/2 and MQA 4/1."""
    gen = torch.Generator().manual_seed(13)
    heads, tokens = 4, 300
    qkv = torch.randn(1, tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).bfloat16()
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(1, tokens, heads, head_dim)
    k, v = (t.view(1, tokens, kv_heads, head_dim) for t in (k, v))
    assert q.stride(1) == (heads + 2 * kv_heads) * head_dim
    out = torch.empty_like(q.contiguous())
    native_kernel.extension().prefill_attention(*(t.transpose(1, 2) for t in (q, k, v, out)), [tokens], [tokens],
                                                [-tokens - 1], [0], head_dim ** -0.5, products)
    kwargs = dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout="BSND", scale_value=head_dim ** -0.5,
                  sparse_mode=3, atten_mask=compressed_causal_mask(), actual_seq_lengths=[tokens])
    _assert_matches_reference(q.contiguous(), k.contiguous(), v.contiguous(), kwargs, out)


@pytest.mark.skipif("amx_bf16" not in cpu_info()["isa_flags"] or not has_matrix_instructions(torch.bfloat16),
                    reason="the kernel's AMX tiles run only on a CPU with AMX-BF16")
@pytest.mark.parametrize("head_dim", [16, 48, 64, 80, 128, 176, 512])
@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (3, 1), (6, 2)])
def test_amx_tiles_agree_with_onednn(head_dim, heads, kv_heads):
    """The AMX tiles' edges: head dims that are and are not multiples of 32 (Q K^T's depth: a last step of 16), row
    counts of 1-16 and 17-32 in a call's last tiles (positions x group heads, lengths below), P V over key ranges of
    16 x odd keys (the causal diagonal, a short sequence, a window), several key blocks. Against oneDNN's brgemm on
    the same instructions: the same exact products, fp32 sums in another order."""
    gen = torch.Generator().manual_seed(head_dim * 7 + heads)
    lens = [1, 17, 530, 1100]
    q = torch.randn(len(lens), max(lens), heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(len(lens), max(lens), kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    extension = native_kernel.extension()
    outs = {}
    for products in ("input_dtype", "input_dtype_onednn"):
        for window in (None, 70):
            out = torch.zeros_like(q)
            lo = [-(n + 1) if window is None else -window for n in lens]
            extension.prefill_attention(*(t.transpose(1, 2) for t in (q, k, v, out)), lens, lens, lo, [0] * len(lens),
                                        head_dim ** -0.5, products)
            outs[products, window] = out
    assert extension.products_route(q, "input_dtype") == "amx_tiles"
    for window in (None, 70):
        torch.testing.assert_close(outs["input_dtype", window].float(), outs["input_dtype_onednn", window].float(),
                                   atol=8e-3, rtol=8e-3)
        for b, n in enumerate(lens):
            assert torch.all(outs["input_dtype", window][b, n:] == 0), "rows past a batch's length were written"


def test_auto_products_follow_the_cpu():
    """bf16/fp16 inputs take the 16-bit products exactly where oneDNN has kernels for them; fp32 never does."""
    extension = native_kernel.extension()
    assert extension.products_for(torch.zeros(1)) == "fp32"
    for dtype in SIXTEEN_BIT:
        assert extension.products_for(torch.zeros(1, dtype=dtype)) in ("fp32", "input_dtype")
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="products must be"):
        extension.prefill_attention(q, q, q, q.clone(), [4], [4], [-4], [0], 1.0, "input_dtype")
    with pytest.raises(RuntimeError, match="products must be"):
        extension.prefill_attention(q, q, q, q.clone(), [4], [4], [-4], [0], 1.0, "bf16")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the CPU's flags as Linux reports them are needed")
def test_products_route_follows_the_cpu_flags():
    """The kernel reads AVX512-BF16 and AMX-BF16 from CPUID itself; Linux's reading of the same bits decides which
    route each dtype takes: bf16 on the kernel's own AMX tiles exactly where the CPU has AMX-BF16, in its own
    VDPBF16PS register tiles where it has AVX512-BF16 and no AMX-BF16, oneDNN's brgemm for the other 16-bit routes,
    "input_dtype_onednn" always brgemm, fp32 never 16-bit."""
    extension = native_kernel.extension()
    flags = cpu_info()["isa_flags"]
    bf16, fp16 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16)
    assert extension.products_route(torch.zeros(1)) == "fp32"
    assert extension.products_route(bf16, "input_dtype_emulated") == "emulated"
    if has_matrix_instructions(torch.bfloat16):
        amx = "amx_bf16" in flags
        tiles = "avx512_bf16" in flags and not amx
        assert extension.products_route(bf16) == extension.products_route(bf16, "input_dtype")
        assert extension.products_route(bf16) == ("amx_tiles" if amx else "bf16_tiles" if tiles else "onednn")
        assert extension.products_route(bf16, "input_dtype_onednn") == "onednn"
    else:
        assert extension.products_route(bf16) == "fp32"
    assert extension.products_route(fp16) == ("onednn" if has_matrix_instructions(torch.float16) else "fp32")


def _direct(out, out_starts, query, key, value, **kwargs) -> bool:
    """The backend's direct call, prepared (validated) and run at once."""
    call = native_kernel.prepare_direct(query, key, value, **kwargs)
    return call is not None and native_kernel.run_direct(call, out, out_starts, query, key, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_into_writes_the_ops_rows_in_place(dtype):
    """The backend's variant: batch b's rows straight into out[out_starts[b]:], nothing else touched."""
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim = 4, 2, 64
    q = torch.randn(3, 50, heads, dim, generator=gen).to(dtype)
    k = torch.randn(3, 80, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(3, 80, kv_heads, dim, generator=gen).to(dtype)
    kwargs = dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout="BSND", scale_value=dim ** -0.5,
                  sparse_mode=3, atten_mask=compressed_causal_mask(), actual_seq_lengths=[50, 7, 30],
                  actual_seq_lengths_kv=[80, 7, 45])
    starts = [0, 90, 55]
    out = torch.full((100, heads, dim), 7.0, dtype=dtype)
    assert _direct(out, starts, q, k, v, **kwargs)
    expected = npu_prompt_flash_attention(q, k, v, **kwargs)
    untouched = torch.ones(100, dtype=torch.bool)
    for b, (start, n) in enumerate(zip(starts, kwargs["actual_seq_lengths"])):
        torch.testing.assert_close(out[start:start + n], expected[b, :n], atol=0, rtol=0)
        untouched[start:start + n] = False
    assert bool((out[untouched] == 7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_into_reads_views_of_a_fused_projection(dtype):
    """vLLM's q, k, v are views of one [tokens, (N + 2 KVN) D] projection: the backend's variant reads them in place
    (the op itself refuses them: its contract is contiguous tensors), with the result of contiguous copies."""
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads, dim = 40, 6, 2, 64
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = (t.view(1, tokens, -1, dim) for t in fused.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    assert not q.is_contiguous()
    kwargs = dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout="BSND", scale_value=dim ** -0.5,
                  sparse_mode=3, atten_mask=compressed_causal_mask(), actual_seq_lengths=[tokens],
                  actual_seq_lengths_kv=[tokens])
    out = torch.empty(tokens, heads, dim, dtype=dtype)
    assert _direct(out, [0], q, k, v, **kwargs)
    expected = npu_prompt_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)
    torch.testing.assert_close(out, expected[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="non-contiguous tensors are not supported"):
        npu_prompt_flash_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="query.*the last axis must have stride 1"):
        _direct(out, [0], q.transpose(2, 3), k, v, **kwargs)


def test_into_declines_what_the_kernel_does_not_compute():
    q = torch.randn(1, 8, 2, 16)
    out = torch.full((8, 2, 16), 7.0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    assert not _direct(out, [0], q, q, q, num_heads=2, input_layout="BSND", sparse_mode=1, atten_mask=mask)
    assert not _direct(out, [0], q, q, q, num_heads=8, input_layout="BNSD")
    assert bool((out == 7).all())
    with pytest.raises(ValueError):  # validated like the op
        _direct(out, [0], q, q, q, num_heads=3, input_layout="BSND")


def test_prepared_call_runs_only_on_the_form_it_was_validated_with():
    """A step's other layers run the first layer's prepared call on their own tensors; tensors of another form (or
    an output of another dtype) are refused, nothing written, so the caller validates them (prepares again)."""
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 12, 4, 16, generator=gen), torch.randn(1, 12, 2, 16, generator=gen)
    kwargs = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", sparse_mode=3,
                  atten_mask=compressed_causal_mask(), actual_seq_lengths=[12], actual_seq_lengths_kv=[12])
    call = native_kernel.prepare_direct(q, k, k, **kwargs)
    out = torch.full((12, 4, 16), 7.0)
    for other in (dict(key=torch.randn(1, 13, 2, 16)), dict(query=q.double()), dict(out=out.bfloat16()),
                  dict(value=torch.randn(1, 12, 2, 32)[..., ::2])):
        args = dict(out=out, query=q, key=k, value=k) | other
        assert not native_kernel.run_direct(call, args["out"], [0], args["query"], args["key"], args["value"])
    assert bool((out == 7).all())
    second_layer = torch.randn(1, 12, 4, 16, generator=gen), torch.randn(1, 12, 2, 16, generator=gen)
    assert native_kernel.run_direct(call, out, [0], second_layer[0], second_layer[1], second_layer[1])
    expected = npu_prompt_flash_attention(second_layer[0], second_layer[1], second_layer[1], **kwargs)
    torch.testing.assert_close(out, expected[0], atol=0, rtol=0)


def test_into_rejects_rows_outside_out():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="leaves rows outside out"):
        _direct(torch.empty(10, 2, 16), [5], q, q, q, num_heads=2, input_layout="BSND", scale_value=1 / math.sqrt(16))


def test_without_bf16_instructions_bf16_takes_the_fp32_products():
    """With oneDNN limited to AVX-512 without bf16 (as on CPUs that lack it) the probe finds no 16-bit kernels and
    "auto" multiplies in fp32, still matching the reference."""
    code = "\n".join([
        "import torch",
        "from vllm_pfa import _C",
        "from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention as op",
        "from vllm_pfa.ops import reference_npu_prompt_flash_attention as ref",
        "assert _C.products_for(torch.zeros(1, dtype=torch.bfloat16)) == 'fp32'",
        "q = torch.randn(1, 2, 300, 64).bfloat16()",
        "kw = dict(num_heads=2, input_layout='BNSD', scale_value=0.125, sparse_mode=3,"
        " atten_mask=compressed_causal_mask())",
        "torch.testing.assert_close(op(q, q, q, **kw).float(), ref(q, q, q, **kw).float(), atol=3e-2, rtol=3e-2)",
    ])
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


KERNEL_FUNCTIONS = ("pack_keys", "convert_keys", "attend_block")


def test_prefetches_are_in_the_binary():
    """The K/V conversions' and the query blocks' prefetches (into L2: rows 4 KiB apart share their L1 sets) must reach
    the machine code: GCC once deleted the conversions' unseen, having found a function made only of _mm_prefetch
    calls free of side effects."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", native_kernel.extension().__file__],
                             capture_output=True, text=True, check=True).stdout
    prefetches, function = {}, None  # per kernel function the listing names (one the compiler inlined is not named)
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = next((name for name in KERNEL_FUNCTIONS if name in line and "@plt" not in line), None)
            if function:
                prefetches.setdefault(function, 0)
        elif function and "prefetcht1" in line:
            prefetches[function] += 1
    if not prefetches:
        pytest.skip("the extension carries no symbols for its kernel functions (stripped)")
    assert all(prefetches.values()), prefetches

"""Issue 10's findings in the native extension: every entry point validates all of its tensors before touching
memory (calls that could crash run in a forked child, so a crash fails the test instead of killing pytest), D = 1
tensors with any last-dim stride, and non-finite scores propagating as in the reference."""

import math
import multiprocessing
import textwrap

import pytest
import torch

from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, reference_npu_prompt_flash_attention
from vllm_pfa.ops import native_kernel

from pfa_cases import counting_native_runs, has_matrix_instructions

pytestmark = pytest.mark.skipif(not native_kernel.available(),
                                reason="the native kernel needs an AVX-512 CPU and a built _C")


def _expect_error(body: str, message: str) -> None:
    """Runs `body` (with `torch` and `_C`) in a forked child: it must raise a RuntimeError saying `message`; a crash
    (a signal: a negative exit code) or a hang fails here instead of killing pytest. Forked rather than a fresh
    interpreter, whose torch import took about 6 s per case; the validation under test runs before any parallel
    region, the one thing a forked child of a threaded parent must not start."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        try:
            exec(textwrap.dedent(body), {"torch": torch, "_C": native_kernel.extension()})
        except RuntimeError as exc:
            send.send(f"RuntimeError: {exc}")
        else:
            send.send("no error")

    process = context.Process(target=child)
    process.start()
    process.join(120)
    if process.exitcode is None:
        process.kill()
    assert process.exitcode == 0, f"the call crashed or hung (exit code {process.exitcode})"
    result = receive.recv() if receive.poll(5) else "no result"
    assert result.startswith("RuntimeError:") and message in result, result


GATHER_SETUP = """
    kc = torch.zeros(4, 1, 128, 32, dtype=torch.bfloat16)
    ko = torch.empty(128, 1, 32, dtype=torch.bfloat16)
"""


@pytest.mark.parametrize("call,message", [
    # issue 10, finding 1: the value cache's block size differs (it read out of bounds)
    ("vc = torch.zeros(4, 1, 1, 32, dtype=torch.bfloat16)\n"
     "_C.gather_paged_kv(kc, vc, torch.tensor([0]), 128, ko, ko.clone(), False, False)", "differ in shape"),
    ("vc = torch.zeros(1, 1, 128, 32, dtype=torch.bfloat16)\n"
     "_C.gather_paged_kv(kc, vc, torch.tensor([3]), 128, ko, ko.clone(), False, False)", "differ in shape"),
    ("_C.gather_paged_kv(kc, kc.float(), torch.tensor([0]), 128, ko, ko.clone(), False, False)", "dtypes differ"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([0]), 128, ko, ko[:, :, :16], False, False)", "values_out shape"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([0]), 128, ko, ko.float(), False, False)", "values_out dtype"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([0]), 128, ko, ko[:1].expand(128, 1, 32), False, False)",
     "overlapping"),
    ("_C.gather_paged_kv(kc, kc[..., ::2], torch.tensor([0]), 128, ko, ko.clone(), False, False)", "dense"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([0]), 128, ko, ko.transpose(0, 2).contiguous().transpose(0, 2), "
     "False, False)", "contiguous last dimension"),
    ("_C.gather_paged_kv(kc[0], kc, torch.tensor([0]), 128, ko, ko.clone(), False, False)", "key_cache must be"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([[0]]), 128, ko, ko.clone(), False, False)", "block_ids"),
    ("_C.gather_paged_kv(kc, kc, torch.tensor([-1]), 128, ko, ko.clone(), False, False)", "out of range"),
    ("_C.gather_paged_kv(kc[:, :, :0], kc[:, :, :0], torch.tensor([0]), 1, ko, ko.clone(), False, False)",
     "block_size is 0"),
])
def test_gather_validates_every_tensor_before_reading(call, message):
    _expect_error(textwrap.dedent(GATHER_SETUP) + call, message)


def test_gather_accepts_head_dim_one_with_any_stride():
    """A [.., 1] tensor is contiguous whatever its last stride (issue 10, finding 3, in the gather)."""
    from vllm_pfa import _C
    kv = torch.randn(3, 2, 4, 2)
    key_cache, value_cache = kv[..., :1], kv[..., 1:]  # head 1, last stride 1, blocks 4 x 1 apart by 2: not dense
    with pytest.raises(RuntimeError, match="dense"):
        _C.gather_paged_kv(key_cache, value_cache, torch.tensor([2, 0]), 6, torch.empty(6, 2, 1),
                           torch.empty(6, 2, 1), False, False)
    key_cache = torch.randn(3, 2, 4, 1).transpose(2, 3).contiguous().transpose(2, 3)  # stride 4 on a size-1 dim
    keys = torch.empty(12).as_strided((6, 2, 1), (2, 1, 7))
    values = torch.empty(6, 2, 1)
    _C.gather_paged_kv(key_cache, key_cache, torch.tensor([2, 0]), 6, keys, values, True, False)
    expected = key_cache[[2, 0]].transpose(1, 2).reshape(8, 2, 1)[:6]
    assert torch.equal(keys, expected) and torch.equal(values, expected)


PREFILL_SETUP = """
    q = torch.randn(1, 2, 8, 16)
    out = torch.empty_like(q)
    args = ([8], [8], [-2**40], [0], 0.25)
"""


@pytest.mark.parametrize("call,message", [
    ("_C.prefill_attention(q, q[:, :, :4], q, out, *args)", "key and value shapes"),
    ("_C.prefill_attention(q, q, q, out, [8], [9], [0], [0], 0.25)", "out of range"),
    ("_C.prefill_attention(q, q, q, out[0], *args)", "out must be [B, N, S, D]"),
    ("_C.prefill_attention(q, q, q, out[:, :1], *args)", "out shape"),
    ("_C.prefill_attention(q, q, q.half(), out, *args)", "share one dtype"),
    ("_C.prefill_attention(q[..., ::2], q[..., ::2], q[..., ::2], out[..., ::2], *args)",
     "contiguous D"),
    ("_C.prefill_attention(q, q, q, out, [8, 8], [8], [0], [0], 0.25)", "one q_len"),
    ("_C.prefill_attention(q.int(), q.int(), q.int(), out.int(), *args)", "unsupported dtype"),
])
def test_prefill_attention_validates_every_tensor_before_reading(call, message):
    _expect_error(textwrap.dedent(PREFILL_SETUP) + call, message)


RUN_OPERATOR_ARGS = "[8], [8], [-2**40], [0], 0.25, 'auto'"


@pytest.mark.parametrize("call,message", [
    (f"h = q.flatten(2)\n_C.run_operator(h, h, h, 'BSH', 0, 2, {RUN_OPERATOR_ARGS}, 0)", "head counts positive"),
    (f"_C.run_operator(q[0], q, q, 'BSND', 2, 2, {RUN_OPERATOR_ARGS}, 0)", "must be 4-D"),
    (f"_C.run_operator(q, q, q, 'BSH', 2, 2, {RUN_OPERATOR_ARGS}, 0)", "must be 3-D"),
    (f"_C.run_operator(q, q, q, 'TND', 2, 2, {RUN_OPERATOR_ARGS}, 0)", "unknown layout"),
    ("_C.run_operator(q, q, q, 'BNSD', 2, 2, [8, 8], [8], [0], [0], 0.25, 'auto', 0)", "one query length"),
    ("_C.run_operator(q, q, q, 'BNSD', 2, 2, [8, 8], [8], [0], [0], 0.25, 'auto', 1 << 40)", "one query length"),
    ("_C.padded_output([2, 3, 4], torch.float32, 1, [1, 1])", "padded_output"),
    ("_C.padded_output([2, 3, 4, 5], torch.float32, 1, [1])", "padded_output"),
    ("_C.padded_output([2, -3, 4, 5], torch.float32, 1, [1, 1])", "negative"),
])
def test_operator_entry_points_validate_before_touching_memory(call, message):
    _expect_error(textwrap.dedent(PREFILL_SETUP) + call, message)


def test_prefill_attention_unbounded_offsets_do_not_overflow():
    from vllm_pfa import _C
    q = torch.randn(1, 2, 8, 16)
    out, expected = torch.empty_like(q), torch.empty_like(q)
    _C.prefill_attention(q, q, q, out, [8], [8], [-2**62], [2**62], 0.25)
    _C.prefill_attention(q, q, q, expected, [8], [8], [-8], [8], 0.25)
    assert torch.equal(out, expected)


def _native_and_reference(q, k, v, heads=2, products="auto"):
    """The op on BNSD tensors, causal (asserting that the native kernel ran, its products forced where `products` is
    not "auto"), and the reference."""
    kwargs = dict(num_heads=heads, input_layout="BNSD", scale_value=1 / math.sqrt(q.shape[-1]), sparse_mode=3,
                  atten_mask=compressed_causal_mask())
    with counting_native_runs(products=products) as calls:
        actual = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert calls, "the native kernel did not run"
    return actual, reference_npu_prompt_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)


def test_head_dim_one_with_a_non_unit_last_stride():
    """Issue 10, finding 3: contiguous D = 1 tensors whose last stride is not 1 (a transpose of a size-1 dim)."""
    q, k, v = (torch.randn(1, 2, 1, 8).transpose(2, 3) for _ in range(3))  # [1, 2, 8, 1], stride(-1) == 8
    assert q.is_contiguous() and q.stride(-1) != 1
    actual, expected = _native_and_reference(q, k, v)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)


def _assert_same_non_finite(actual, expected, tol):
    assert torch.equal(actual.isnan(), expected.isnan()), (actual.isnan().nonzero(), expected.isnan().nonzero())
    assert torch.equal(actual.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite].float(), expected[finite].float(), atol=tol, rtol=tol)


# Each way the kernel forms weights: fp32 products; the 16-bit products on the instructions (bf16: the kernel's own
# tiles or oneDNN's where the CPU has them) and emulated (bf16 and fp16 weights rounded by AVX-512F code).
NON_FINITE_ROUTES = [
    pytest.param(torch.float32, "auto", 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, "auto", 3e-2, id="bf16"),
    pytest.param(torch.bfloat16, "input_dtype_onednn", 3e-2, id="bf16_onednn",
                 marks=pytest.mark.skipif(not has_matrix_instructions(torch.bfloat16),
                                          reason="no bf16 matrix instructions")),
    pytest.param(torch.bfloat16, "input_dtype_emulated", 3e-2, id="bf16_emulated"),
    pytest.param(torch.float16, "input_dtype_emulated", 1e-2, id="fp16_emulated"),
]


@pytest.mark.parametrize("dtype,products,tol", NON_FINITE_ROUTES)
@pytest.mark.parametrize("seq", [40, 300])
def test_nan_in_a_kept_key_makes_its_rows_nan(dtype, products, seq, tol):
    """Issue 10, finding 5: rows that keep a NaN key are NaN (the kernel used to drop the key as if masked)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 64, generator=gen).to(dtype) for _ in range(3))
    k[0, 1, seq // 2, 3] = float("nan")  # causal: rows >= seq // 2 of heads 1 keep it, earlier rows do not
    actual, expected = _native_and_reference(q, k, v, products=products)
    assert bool(expected[0, 1, seq // 2:].isnan().all()) and not bool(expected[0, :, : seq // 2].isnan().any())
    _assert_same_non_finite(actual, expected, tol)


@pytest.mark.parametrize("dtype,products,tol", NON_FINITE_ROUTES)
def test_infinite_scores_as_in_the_reference(dtype, products, tol):
    """A +inf kept score makes its row NaN (softmax's exp(inf - inf)); a -inf kept score weighs 0 unless every
    kept score of the row is -inf (NaN again)."""
    gen = torch.Generator().manual_seed(1)
    seq = 300
    q, k, v = (torch.randn(1, 2, seq, 32, generator=gen).to(dtype) for _ in range(3))
    q[0, 0, 7] = 0
    q[0, 0, 7, 0] = float("inf")
    k[0, 0, :, 0] = 1.0
    k[0, 0, 5, 0] = -1.0  # row 7 of head 0: +inf scores except key 5 (-inf)
    q[0, 1, 200] = 0
    q[0, 1, 200, 0] = float("-inf")
    k[0, 1, :, 0] = torch.linspace(0.5, 1.0, seq).to(dtype)  # row 200 of head 1: all kept scores -inf
    q[0, 1, 250] = 0
    q[0, 1, 250, 0] = -1e30
    k[0, 1, 240, 0] = -1.0  # row 250 of head 1: one huge score, the rest -inf or tiny
    actual, expected = _native_and_reference(q, k, v, products=products)
    assert bool(expected[0, 0, 7].isnan().all()) and bool(expected[0, 1, 200].isnan().all())
    _assert_same_non_finite(actual, expected, tol)


@pytest.mark.parametrize("dtype,products,tol", NON_FINITE_ROUTES)
def test_one_minus_inf_score_among_finite_ones_weighs_zero(dtype, products, tol):
    """A -inf kept score beside finite ones weighs 0 and leaves its rows finite (with AVX512-BF16's rounding the
    kernel's first softmax pass takes no sum of the scores that would find it)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=gen).to(dtype) for _ in range(3))
    q[0, 0, :, 0] = 1.0
    k[0, 0, 20, 0] = float("-inf")  # causal: rows >= 20 of head 0 keep one -inf score
    actual, expected = _native_and_reference(q, k, v, products=products)
    assert bool(expected.isfinite().all())
    _assert_same_non_finite(actual, expected, tol)


@pytest.mark.parametrize("dtype,products,tol", NON_FINITE_ROUTES)
def test_non_finite_values_count_only_where_kept(dtype, products, tol):
    """Policy rule 1 and 4 (reference.py): a NaN/inf value of a masked key is never read; a kept one propagates
    (inf where its weight is > 0)."""
    gen = torch.Generator().manual_seed(2)
    seq = 300
    q, k, v = (torch.randn(1, 2, seq, 64, generator=gen).to(dtype) for _ in range(3))
    v[0, 0, 100, 5] = float("inf")  # causal: rows >= 100 keep it, rows 96..99 share its tiles but mask it
    v[0, 1, 270, 7] = float("nan")
    actual, expected = _native_and_reference(q, k, v, products=products)
    assert bool(expected[0, 0, 100:, 5].isinf().all()) and not bool(expected[0, 0, :100].isinf().any())
    _assert_same_non_finite(actual, expected, tol)

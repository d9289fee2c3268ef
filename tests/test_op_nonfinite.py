"""NaN/Inf policy (vllm_pfa/ops/reference.py's docstring): the reference and every Python path agree with it."""

import pytest
import torch

from pfa_cases import make_qkv
from test_op_reference import brute_force
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, reference_npu_prompt_flash_attention
from vllm_pfa.ops import native_kernel, sdpa_path, vllm_cpu_kernel

NAN, INF = float("nan"), float("inf")


def _no_plan(*args, **kwargs):
    return None


def _route(monkeypatch, route):
    """Forces one Python route: the routes before it are switched off (the native kernel always)."""
    monkeypatch.setattr(native_kernel, "plan", _no_plan)
    if route == "sdpa":
        monkeypatch.setattr(sdpa_path, "MIN_SEQ", 1)
    elif route == "blockwise":
        monkeypatch.setattr(vllm_cpu_kernel, "plan", _no_plan)


def _problem(mode):
    q, k, v = make_qkv("BNSD", 2, 2, 1, 8, 8, 64, torch.float32, seed=4)
    kwargs = dict(num_heads=2, num_key_value_heads=1, input_layout="BNSD", scale_value=0.125, sparse_mode=mode,
                  actual_seq_lengths=[8, 6], actual_seq_lengths_kv=[8, 6])
    if mode:
        kwargs["atten_mask"] = compressed_causal_mask()
    return q, k, v, kwargs


def _assert_same(actual, expected):
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual.double(), expected.double(), atol=1e-5, rtol=1e-5, equal_nan=True)


ROUTES = ["reference", "default", "sdpa", "vllm_kernel", "blockwise"]


def _run(monkeypatch, route, q, k, v, kwargs):
    if route == "reference":
        return reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    if route == "vllm_kernel" and vllm_cpu_kernel._kernel_head_sizes() is None:
        pytest.skip("vLLM's CPU attention kernel is not available")
    _route(monkeypatch, route)
    return npu_prompt_flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("route", ROUTES)
def test_masked_keys_are_never_read(route, monkeypatch):
    """Causal: key 7 is masked for rows 0..6; NaN/inf in its K and V changes nothing there (no 0 x inf)."""
    q, k, v, kwargs = _problem(3)
    clean = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    k[0, :, 7], v[0, 0, 7, :3] = NAN, torch.tensor([INF, -INF, NAN])
    out = _run(monkeypatch, route, q, k, v, kwargs)
    torch.testing.assert_close(out[0, :, :7], clean[0, :, :7])
    assert out[0, :, 7].isnan().all()  # row 7 keeps key 7: a NaN key score makes the whole row NaN
    torch.testing.assert_close(out[1], clean[1])
    _assert_same(out, brute_force(q, k, v, **kwargs))


@pytest.mark.parametrize("route", ROUTES)
def test_kept_non_finite_values_propagate(route, monkeypatch):
    """Unmasked: V = +inf at a kept key gives +inf in that column, NaN V gives NaN there, +inf score a NaN row;
    rows past actual_seq_lengths stay 0 whatever their query holds."""
    q, k, v, kwargs = _problem(0)
    v[0, 0, 2, 0], v[0, 0, 3, 1], v[0, 0, 4, 2], v[0, 0, 5, 2] = INF, NAN, INF, -INF
    q[1, 1, 3], q[1, 0, 7] = torch.cat([torch.tensor([INF]), torch.zeros(63)]), NAN
    k[1, 0, 0] = torch.cat([torch.tensor([1.0]), torch.zeros(63)])  # score +inf for key 0 of row 3, head 1
    out = _run(monkeypatch, route, q, k, v, kwargs)
    assert out[0, :, :, 0].isposinf().all() and out[0, :, :, 1].isnan().all() and out[0, :, :, 2].isnan().all()
    assert out[0, :, :, 3:].isfinite().all()
    assert out[1, 1, 3].isnan().all() and not out[1, 0, 6:].any()
    _assert_same(out, brute_force(q, k, v, **kwargs))


@pytest.mark.parametrize("route", ["reference", "default", "blockwise"])
def test_pse_minus_inf_on_kept_keys(route, monkeypatch):
    """-inf pse at a kept key is weight 0 (x inf V: NaN); a row whose kept scores are all -inf is NaN;
    pse at masked positions is never read."""
    q, k, v, kwargs = _problem(3)
    pse = torch.randn(1, 2, 8, 8)
    pse[0, 0, 4, :3] = -INF  # row 4 keeps keys 0..4: weight 0 for keys 0..2
    pse[0, 0, 1, :2] = -INF  # row 1 keeps keys 0..1: nothing finite
    pse[0, 1, 2, 3:] = NAN  # masked for row 2
    v[0, 0, 1, 5] = INF
    kwargs["pse_shift"] = pse
    out = _run(monkeypatch, route, q, k, v, kwargs)
    assert out[0, 0, 4, 5].isnan() and out[0, 0, 4, :5].isfinite().all() and out[0, 0, 1].isnan().all()
    assert not out[0, 1, 2].isnan().any()  # (its column 5 is +inf: key 1 is kept with weight > 0)
    _assert_same(out, brute_force(q, k, v, **kwargs))

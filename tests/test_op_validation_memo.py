"""The public function's validation memo (`validation.validate_plain_call`): a plain call's problem is remembered by
its arguments' signature, and every call gets what `validate` would give it, the same problem or the same error."""

import math
import weakref

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from test_op_fuzz import build, cases
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, validation
from vllm_pfa.ops.api import _PUBLIC_DEFAULTS

pytestmark = pytest.mark.skipif(validation._tensor_signature() is None,
                                reason="the memo's tensor signature is native code: vllm_pfa._C is not built here")


def _outcome(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - the error itself is the outcome compared
        return type(error), str(error)


def _arguments(**kwargs) -> dict:
    return {**_PUBLIC_DEFAULTS, **kwargs}


def _call(q, k, v, arguments):
    return (lambda: validation.validate(q, k, v, **arguments)), \
        (lambda: validation.validate_plain_call(q, k, v, arguments))


@pytest.fixture(autouse=True)
def empty_memo():
    validation._validated.clear()
    yield
    validation._validated.clear()


def test_fuzzed_calls_validate_as_without_the_memo():
    """The op fuzz's cases (every layout, dtype, mask and length form, one deliberate violation in many), one memo
    for all of them: each call, the first time and again, has `validate`'s outcome, so no two signatures that
    validate differently meet."""
    seen = {"memoized": 0, "errors": 0}

    @settings(max_examples=400, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def run(spec):
        q, k, v, kwargs, _ = build(spec)
        # and a sibling call after it: the same tensors, each length one more (the same metadata where the lengths
        # are tensors, whose values validation reads)
        sibling = {name: _one_more(value) for name, value in kwargs.items() if name.startswith("actual_seq_lengths")}
        for arguments in (_arguments(**kwargs), _arguments(**{**kwargs, **sibling})):
            validate, memoized = _call(q, k, v, arguments)
            expected = _outcome(validate)
            assert _outcome(memoized) == expected
            assert _outcome(memoized) == expected
            seen["errors"] += isinstance(expected, tuple)
        seen["memoized"] = max(seen["memoized"], len(validation._validated))

    run()
    assert seen["memoized"] > 100 and seen["errors"] > 50, seen  # both kinds of call were drawn


def _one_more(lengths):
    """Lengths each one more, in their form (a mutation's other forms as they are)."""
    if isinstance(lengths, torch.Tensor) and not lengths.is_floating_point() and lengths.dtype != torch.bool:
        return lengths + 1
    if isinstance(lengths, (list, tuple)) and all(type(item) is int for item in lengths):
        return [item + 1 for item in lengths]
    return lengths


def _plain_call():
    q, k, v = (torch.randn(1, 16, heads, 8) for heads in (4, 2, 2))
    return q, k, v, _arguments(num_heads=4, num_key_value_heads=2, input_layout="BSND", scale_value=0.25,
                               sparse_mode=3, atten_mask=compressed_causal_mask(), actual_seq_lengths=[16])


@pytest.mark.parametrize("name, value, error", [
    ("next_tokens", 0.0, TypeError),  # 0 was remembered: 0.0 is refused
    ("num_heads", True, TypeError),
    ("actual_seq_lengths", [16.0], TypeError),
    ("actual_seq_lengths", [17], ValueError),
    ("input_layout", "BNSD", ValueError),
])
def test_values_that_validate_differently_are_not_confused(name, value, error):
    q, k, v, arguments = _plain_call()
    validation.validate_plain_call(q, k, v, arguments)
    with pytest.raises(error, match=name.split("_")[0]):
        validation.validate_plain_call(q, k, v, {**arguments, name: value})


def test_tensor_metadata_that_validates_differently_is_not_confused():
    q, k, v, arguments = _plain_call()
    validation.validate_plain_call(q, k, v, arguments)
    strided = torch.randn(1, 16, 8, 4).transpose(2, 3)  # q's shape, not contiguous
    with pytest.raises(ValueError, match="non-contiguous"):
        validation.validate_plain_call(strided, k, v, arguments)
    with pytest.raises(ValueError, match="atten_mask.device"):
        validation.validate_plain_call(q, k, v, {**arguments, "atten_mask": arguments["atten_mask"].to("meta")})
    with pytest.raises(TypeError, match="key.dtype"):
        validation.validate_plain_call(q, k.half(), v, arguments)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("change", ["subclass", "numpy_int", "zero_dim_tensor", "length_tensor", "nan_scale",
                                    "bool_heads"])
def test_other_forms_are_validated_every_call(change):
    """Arguments whose validation may read more than a signature holds (a subclass, numpy and 0-d tensor values,
    length tensors) or that never equal themselves (NaN) are not remembered, and still validate as without it."""
    q, k, v, arguments = _plain_call()
    arguments = {**arguments, **{
        "numpy_int": {"num_heads": numpy.int64(4)},
        "zero_dim_tensor": {"pre_tokens": torch.tensor(5)},
        "length_tensor": {"actual_seq_lengths": torch.tensor([16])},
        "nan_scale": {"scale_value": math.nan},
        "bool_heads": {"num_key_value_heads": False},
    }.get(change, {})}
    if change == "subclass":
        q = q.as_subclass(_Subclass)
    validate, memoized = _call(q, k, v, arguments)
    assert _outcome(memoized) == _outcome(validate)
    assert validation._validated == {}


def test_the_memo_is_bounded_and_holds_no_tensor():
    q, k, v, arguments = _plain_call()
    alive = weakref.ref(q)
    for scale in range(validation.MAX_VALIDATED * 3 // 2):
        validation.validate_plain_call(q, k, v, {**arguments, "scale_value": float(scale)})
        assert 0 < len(validation._validated) <= validation.MAX_VALIDATED
    del q
    assert alive() is None


def test_the_public_function_remembers_plain_calls():
    q, k, v, arguments = _plain_call()
    kwargs = {name: value for name, value in arguments.items() if value is not _PUBLIC_DEFAULTS[name]}
    first = npu_prompt_flash_attention(q, k, v, **kwargs)
    assert len(validation._validated) == 1
    assert torch.equal(npu_prompt_flash_attention(q, k, v, **kwargs), first)
    assert len(validation._validated) == 1

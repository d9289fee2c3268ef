"""Every documented constraint of the operator, each answered with an error naming parameter, value and rule."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pfa_cases import count_ops, make_qkv
from vllm_pfa.ops import api, compressed_causal_mask, npu_prompt_flash_attention, npu_trans_quant_param, validation

MASK = compressed_causal_mask()


def _call(layout="BSND", dtype=torch.float16, batch=2, heads=4, kv_heads=2, q_seq=8, kv_seq=8, dim=16,
          tensors=None, **kwargs):
    q, k, v = tensors or make_qkv(layout, batch, heads, kv_heads, q_seq, kv_seq, dim, dtype)
    kwargs.setdefault("num_heads", heads)
    kwargs.setdefault("num_key_value_heads", kv_heads)
    return npu_prompt_flash_attention(q, k, v, input_layout=layout, **kwargs)


def _int8_scales():
    return dict(deq_scale1=npu_trans_quant_param(torch.tensor([0.01])), quant_scale1=torch.tensor([100.0]),
                deq_scale2=torch.tensor([0.01]))


Q8 = make_qkv("BSND", 2, 4, 2, 8, 8, 32, torch.int8)

CASES = {
    # (call kwargs, error type, fragments the message must contain)
    "layout string": (dict(input_layout_override="TND"), ValueError, ["input_layout", "'TND'", "must be one of"]),
    "layout type": (dict(input_layout_override=3), TypeError, ["input_layout", "must be a str"]),
    "sparse_mode range": (dict(sparse_mode=5), ValueError, ["sparse_mode", "sparse_mode = 5 is out of range"]),
    "sparse_mode 8": (dict(sparse_mode=8), ValueError, ["sparse_mode = 8 is out of range"]),
    "sparse_mode negative": (dict(sparse_mode=-1), ValueError, ["sparse_mode = -1 is out of range"]),
    "num_heads range": (dict(num_heads=257, tensors=make_qkv("BSH", 1, 1, 1, 2, 2, 257 * 16, torch.float16)),
                        ValueError, ["num_heads", "257", "[1, 256]"]),
    "num_heads zero": (dict(num_heads=0), ValueError, ["num_heads", "[1, 256]"]),
    "num_heads type": (dict(num_heads=4.0), TypeError, ["num_heads", "must be an int"]),
    "num_heads vs N axis": (dict(num_heads=2), ValueError, ["num_heads", "query's N axis = 4"]),
    "kv heads divisibility": (dict(heads=6, kv_heads=4), ValueError,
                              ["num_key_value_heads", "numHeads(6) must be divisible by numKeyValueHeads(4)"]),
    "kv heads ratio": (dict(heads=130, kv_heads=2, q_seq=1, kv_seq=1), ValueError,
                       ["numHeads / numKeyValueHeads = 65, cannot be larger than 64"]),
    "kv heads vs key N": (dict(tensors=make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16), num_key_value_heads=1),
                          ValueError, ["num_key_value_heads", "key/value N axis is 2"]),
    "kv heads default vs key N": (dict(tensors=make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16),
                                       num_key_value_heads=0), ValueError, ["num_key_value_heads = 0", "0 means"]),
    "head dim": (dict(dim=528, heads=2, kv_heads=2, q_seq=2, kv_seq=2), ValueError, ["D = 528", "d should <= 512"]),
    "N*D BSND": (dict(heads=256, kv_heads=256, dim=256, q_seq=1, kv_seq=1, batch=1), ValueError,
                 ["N*D = 65536", "< 65535"]),
    "BSH H divisible": (dict(layout="BSH", tensors=make_qkv("BSH", 1, 1, 1, 2, 2, 30, torch.float16), num_heads=4,
                             num_key_value_heads=0), ValueError, ["query.shape", "divisible by num_heads = 4"]),
    "BSH key H": (dict(layout="BSH", tensors=(make_qkv("BSH", 1, 4, 4, 2, 2, 16, torch.float16)[0],
                                              *make_qkv("BSH", 1, 3, 3, 2, 2, 16, torch.float16)[1:]),
                       num_key_value_heads=2), ValueError, ["key.shape", "num_key_value_heads * D"]),
    "rank": (dict(tensors=make_qkv("BSH", 1, 4, 2, 2, 2, 16, torch.float16)), ValueError,
             ["query.shape", "needs a 4-D tensor"]),
    "key value shapes": (dict(tensors=(*make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)[:2],
                                       torch.zeros(2, 9, 2, 16, dtype=torch.float16))),
                         ValueError, ["value.shape", "must equal key.shape"]),
    "batch mismatch": (dict(tensors=(make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)[0],
                                     *make_qkv("BSND", 3, 4, 2, 8, 8, 16, torch.float16)[1:])),
                       ValueError, ["key.shape", "B of key must equal B of query = 2"]),
    "head dim mismatch": (dict(tensors=(make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)[0],
                                        *make_qkv("BSND", 2, 4, 2, 8, 8, 32, torch.float16)[1:])),
                          ValueError, ["key.shape", "D of key must equal D of query = 16"]),
    "query dtype": (dict(dtype=torch.float64), TypeError, ["query.dtype", "torch.float64", "must be one of"]),
    "key dtype": (dict(tensors=(make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)[0],
                                *make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.bfloat16)[1:])),
                  TypeError, ["key.dtype", "must equal query.dtype"]),
    "query type": (dict(tensors=([1.0], [1.0], [1.0])), TypeError, ["query", "must be a torch.Tensor"]),
    "non-contiguous": (dict(tensors=(make_qkv("BNSD", 2, 4, 2, 8, 8, 16, torch.float16)[0].transpose(1, 2),
                                     *make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)[1:])),
                       ValueError, ["query", "non-contiguous"]),
    "unaligned D batch": (dict(dtype=torch.float16, dim=10, batch=129, heads=1, kv_heads=1, q_seq=1, kv_seq=1),
                          ValueError, ["B = 129", "not 32-byte aligned"]),
    "mask dtype": (dict(atten_mask=torch.zeros(8, 8)), TypeError, ["atten_mask.dtype", "torch.float32"]),
    "mask shape": (dict(atten_mask=torch.zeros(7, 8, dtype=torch.bool)), ValueError,
                   ["atten_mask.shape", "[7, 8]", ">=8"]),
    "mask batch": (dict(atten_mask=torch.zeros(3, 8, 8, dtype=torch.bool)), ValueError,
                   ["atten_mask.shape", "1 or B=2"]),
    "mask 4d head axis": (dict(atten_mask=torch.zeros(2, 2, 8, 8, dtype=torch.bool)), ValueError,
                          ["atten_mask.shape", "[2, 2, 8, 8]"]),
    "mask non-contiguous": (dict(atten_mask=torch.zeros(8, 8, dtype=torch.bool).t()), ValueError,
                            ["atten_mask", "non-contiguous"]),
    "mode 1 needs mask": (dict(sparse_mode=1), ValueError, ["atten_mask = None", "sparse_mode = 1"]),
    "mode 2 needs mask": (dict(sparse_mode=2), ValueError, ["attenMask shape must be (2048, 2048)", "sparse mode = 2"]),
    "mode 3 compressed mask": (dict(sparse_mode=3, atten_mask=torch.zeros(8, 8, dtype=torch.bool)), ValueError,
                               ["atten_mask = [8, 8]", "when sparse mode = 3"]),
    "mode 4 compressed mask": (dict(sparse_mode=4, atten_mask=MASK.view(1, 2048, 1, 2048)), ValueError,
                               ["when sparse mode = 4"]),
    "pse shape": (dict(pse_shift=torch.zeros(2, 3, 8, 8, dtype=torch.float16)), ValueError,
                  ["pse_shift.shape", "pse shift shape must be [1 or B=2, N=4, >=Sq=8, >=Skv=8]"]),
    "pse short": (dict(pse_shift=torch.zeros(1, 4, 8, 7, dtype=torch.float16)), ValueError, ["pse_shift.shape"]),
    "pse dtype fp16": (dict(pse_shift=torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16)), TypeError,
                       ["pse_shift.dtype", "torch.bfloat16"]),
    "pse dtype bf16": (dict(dtype=torch.bfloat16, pse_shift=torch.zeros(1, 4, 8, 8, dtype=torch.float16)), TypeError,
                       ["pse_shift.dtype", "torch.float16"]),
    "actual lengths count 2": (dict(batch=3, actual_seq_lengths=[1, 2]), ValueError,
                               ["len(actual_seq_lengths) = 2", "must be 1 or >= B = 3"]),
    "actual kv lengths count": (dict(batch=3, actual_seq_lengths_kv=[1, 2]), ValueError,
                                ["len(actual_seq_lengths_kv) = 2"]),
    "actual length range": (dict(actual_seq_lengths=[9, 1]), ValueError,
                            ["actual_seq_lengths[0] = 9", "[0, query S = 8]"]),
    "actual length negative": (dict(actual_seq_lengths=[1, -1]), ValueError, ["actual_seq_lengths[1] = -1"]),
    "actual kv length range": (dict(actual_seq_lengths_kv=[3, 9]), ValueError,
                               ["actual_seq_lengths_kv[1] = 9", "[0, key/value S = 8]"]),
    "actual length type": (dict(actual_seq_lengths=[1.5]), TypeError, ["actual_seq_lengths[0]", "must be an int"]),
    "actual length tensor": (dict(actual_seq_lengths=torch.tensor([1.0])), TypeError, ["actual_seq_lengths"]),
    "pre_tokens type": (dict(pre_tokens=1.0), TypeError, ["pre_tokens", "must be an int"]),
    "next_tokens range": (dict(next_tokens=2**64), ValueError, ["next_tokens"]),
    "scale type": (dict(scale_value="1"), TypeError, ["scale_value", "must be a float"]),
    # Forms the dispatcher converts for torch_npu that only a mistake passes (validation.py, "the argument forms").
    "num_heads bool": (dict(num_heads=True), TypeError, ["num_heads = True", "must be an int"]),
    "num_heads numpy bool": (dict(num_heads=np.bool_(True)), TypeError, ["num_heads = np.True_", "must be an int"]),
    "num_heads bool tensor": (dict(num_heads=torch.tensor(True)), TypeError, ["num_heads = tensor(True)"]),
    "num_heads float tensor": (dict(num_heads=torch.tensor(4.0)), TypeError, ["num_heads = tensor(4.)"]),
    "num_heads numpy float": (dict(num_heads=np.float32(4)), TypeError, ["num_heads = np.float32(4.0)"]),
    "num_heads 1-D tensor": (dict(num_heads=torch.tensor([4])), TypeError, ["num_heads = tensor([4])"]),
    "num_heads numpy array": (dict(num_heads=np.array(4)), TypeError, ["num_heads = array(4)", "must be an int"]),
    "scale bool": (dict(scale_value=True), TypeError, ["scale_value = True", "must be a float"]),
    "scale numpy bool": (dict(scale_value=np.bool_(True)), TypeError, ["scale_value = np.True_", "must be a float"]),
    "scale bool tensor": (dict(scale_value=torch.tensor(True)), TypeError, ["scale_value = tensor(True)"]),
    "scale complex": (dict(scale_value=0.5 + 0j), TypeError, ["scale_value = (0.5+0j)", "must be a float"]),
    "scale tensor needing grad": (dict(scale_value=torch.tensor(0.5, requires_grad=True)), TypeError,
                                  ["scale_value = tensor(0.5000, requires_grad=True)", "must be a float"]),
    "scale 1-D tensor": (dict(scale_value=torch.tensor([0.5])), TypeError, ["scale_value", "must be a float"]),
    "int8 needs scales": (dict(tensors=Q8), ValueError,
                          ["deq_scale1 = None", "needs deq_scale1, quant_scale1 and deq_scale2"]),
    "int8 needs quant_scale1": (dict(tensors=Q8, **{**_int8_scales(), "quant_scale1": None}), ValueError,
                                ["quant_scale1 = None"]),
    "int8 fp16 out forbids offset": (dict(tensors=Q8, quant_offset2=torch.tensor([1.0]), **_int8_scales()),
                                     ValueError, ["quant_offset2", "needs quant_scale2"]),
    "float forbids deq_scale1": (dict(deq_scale1=torch.tensor([1.0])), ValueError,
                                 ["deq_scale1", "must be None for a torch.float16 query"]),
    "float forbids quant_scale1": (dict(quant_scale2=torch.tensor([1.0]), quant_scale1=torch.tensor([1.0])),
                                   ValueError, ["quant_scale1", "must be None"]),
    "float offset without scale": (dict(quant_offset2=torch.tensor([1.0])), ValueError,
                                   ["quant_offset2", "given without quant_scale2"]),
    "deq scale dtype": (dict(tensors=Q8, **{**_int8_scales(), "deq_scale2": torch.tensor([1.0]).half()}), TypeError,
                        ["deq_scale2.dtype", "torch.float16"]),
    "deq scale per-tensor": (dict(tensors=Q8, **{**_int8_scales(), "deq_scale1": torch.ones(2)}), ValueError,
                             ["deq_scale1.shape", "per-tensor"]),
    "quant_scale1 dtype": (dict(tensors=Q8, **{**_int8_scales(), "quant_scale1": torch.ones(1, dtype=torch.float64)}),
                           TypeError, ["quant_scale1.dtype"]),
    "quant_scale2 bf16 needs bf16 input": (dict(quant_scale2=torch.ones(1, dtype=torch.bfloat16)), TypeError,
                                           ["quant_scale2.dtype", "torch.bfloat16"]),
    "offset dtype mismatch": (dict(dtype=torch.bfloat16, quant_scale2=torch.ones(1),
                                   quant_offset2=torch.ones(1, dtype=torch.bfloat16)), ValueError,
                              ["quant_offset2", "quant_scale2's dtype and shape"]),
    "offset shape mismatch": (dict(quant_scale2=torch.ones(1), quant_offset2=torch.ones(1, 1)), ValueError,
                              ["quant_offset2", "quant_scale2's dtype and shape"]),
    "per-channel size": (dict(quant_scale2=torch.ones(7)), ValueError, ["quant_scale2.shape", "N*D = 64"]),
    "per-channel BSH size": (dict(layout="BSH", quant_scale2=torch.ones(5), kv_heads=4), ValueError,
                             ["quant_scale2.shape", "H = 64"]),
    "per-channel unaligned D": (dict(dim=8, quant_scale2=torch.ones(32)), ValueError,
                                ["quant_scale2.shape", "32-byte aligned"]),
    "int8 out band negative": (dict(sparse_mode=4, atten_mask=MASK, pre_tokens=-1, quant_scale2=torch.ones(1)),
                               ValueError, ["pre_tokens/next_tokens", "negative"]),
    "int8 out mode 3 rows": (dict(sparse_mode=3, atten_mask=MASK, quant_scale2=torch.ones(1),
                                  quant_offset2=torch.ones(1), actual_seq_lengths_kv=[4]), ValueError,
                             ["actual_seq_lengths=8, actual_seq_lengths_kv=4", "sparse_mode = 3"]),
    "int8 out mode 0 rows": (dict(atten_mask=torch.zeros(8, 8, dtype=torch.bool), next_tokens=-1,
                                  quant_scale2=torch.ones(1), quant_offset2=torch.ones(1)), ValueError,
                             ["sparse_mode = 0 would leave rows uncomputed"]),
    "int8 out mode 4 rows": (dict(sparse_mode=4, atten_mask=MASK, pre_tokens=5, next_tokens=0,
                                  quant_scale2=torch.ones(1), quant_offset2=torch.ones(1),
                                  actual_seq_lengths_kv=[2]), ValueError, ["sparse_mode = 4 would leave rows"]),
    "int8 empty": (dict(tensors=make_qkv("BSND", 1, 4, 2, 0, 8, 32, torch.int8), **_int8_scales()), ValueError,
                   ["int8 inputs must not be empty"]),
    # Every tensor argument on the query's device: a meta tensor next to CPU ones would dispatch to the fake kernel.
    **{f"{name} on meta": (dict(tensors=tensors, **{**extra, name: value.to("meta")}), ValueError,
                           [f"{name}.device = meta", "must equal query.device = cpu"])
       for name, value, extra, tensors in [
           ("atten_mask", torch.zeros(8, 8, dtype=torch.bool), {}, None),
           ("pse_shift", torch.zeros(1, 4, 8, 8, dtype=torch.float16), {}, None),
           ("padding_mask", torch.zeros(2, 8, 8, dtype=torch.float16), {}, None),
           ("quant_scale2", torch.ones(1), {}, None),
           ("quant_offset2", torch.ones(1), {"quant_scale2": torch.ones(1)}, None),
           ("deq_scale1", torch.ones(1), _int8_scales(), Q8),
           ("quant_scale1", torch.ones(1), _int8_scales(), Q8),
           ("deq_scale2", torch.ones(1), _int8_scales(), Q8),
           ("actual_seq_lengths", torch.tensor([3]), {}, None),
           ("actual_seq_lengths_kv", torch.tensor([3]), {}, None),
       ]},
    "key on meta": (dict(tensors=(Q8[0].half(), Q8[1].half().to("meta"), Q8[2].half())), ValueError,
                    ["key.device = meta"]),
    # actual_seq_lengths(_kv): a list/tuple of ints or a 1-D integer tensor, nothing else.
    **{f"actual lengths {label}": (dict(**{name: value}), TypeError, [f"{name} = ", "a list or tuple of ints"])
       for name in ("actual_seq_lengths", "actual_seq_lengths_kv")
       for label, value in [("int", 3), ("float", 3.0), ("dict", {0: 3}), ("str", "3"), ("bool tensor",
                            torch.tensor([True])), ("0-d tensor", torch.tensor(3)), ("2-D tensor",
                            torch.tensor([[3]])), ("complex tensor", torch.tensor([3 + 0j])), ("2-D array",
                            np.array([[3]])), ("bool array", np.array([True])), ("float array", np.array([3.0])),
                            ("0-d array", np.array(3))]},
    "actual lengths bool element": (dict(actual_seq_lengths=[True]), TypeError,
                                    ["actual_seq_lengths[0] = True", "must be an int"]),
    "padding_mask str": (dict(padding_mask="x"), TypeError, ["padding_mask = str", "must be a torch.Tensor"]),
    "padding_mask int": (dict(padding_mask=3), TypeError, ["padding_mask = int", "must be a torch.Tensor"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_constraint_is_rejected(name):
    kwargs, error, fragments = CASES[name]
    kwargs = dict(kwargs)
    layout = kwargs.pop("input_layout_override", None)
    shape_keys = {"layout", "dtype", "batch", "heads", "kv_heads", "q_seq", "kv_seq", "dim", "tensors"}
    shape = {key: kwargs.pop(key) for key in list(kwargs) if key in shape_keys}
    if layout is not None:
        q, k, v = make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float16)
        call = lambda: npu_prompt_flash_attention(q, k, v, num_heads=4, input_layout=layout)  # noqa: E731
    else:
        call = lambda: _call(**shape, **kwargs)  # noqa: E731
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith("npu_prompt_flash_attention: ")
    for fragment in fragments:
        assert fragment in message, message


def test_valid_baseline_call_passes():
    """The baseline the constraint cases start from is itself valid."""
    assert _call().shape == (2, 8, 4, 16)
    assert _call(tensors=Q8, **_int8_scales()).dtype == torch.float16


def test_meta_lengths_tensor_with_meta_query_is_rejected():
    """A meta tensor holds no values to read lengths from, even where the query is on meta too."""
    q = torch.zeros(1, 2, 4, 16, device="meta")
    with pytest.raises(ValueError, match=r"actual_seq_lengths_kv = .*meta.* holds no values"):
        npu_prompt_flash_attention(q, q, q, num_heads=2, input_layout="BNSD",
                                   actual_seq_lengths_kv=torch.tensor([3], device="meta"))


def test_integer_lengths_tensors_and_tuples_are_accepted():
    q, k, v = make_qkv("BSND", 2, 2, 2, 5, 7, 16, torch.float32)
    kw = dict(num_heads=2, input_layout="BSND")
    expected = npu_prompt_flash_attention(q, k, v, actual_seq_lengths=[3, 5], actual_seq_lengths_kv=[7, 2], **kw)
    for form in (tuple, lambda x: torch.tensor(x, dtype=torch.int32), lambda x: torch.tensor(x, dtype=torch.uint8)):
        actual = npu_prompt_flash_attention(q, k, v, actual_seq_lengths=form([3, 5]),
                                            actual_seq_lengths_kv=form([7, 2]), **kw)
        torch.testing.assert_close(actual, expected)


def _counting_validate(monkeypatch) -> list:
    """Counts validations: the public function's (through `validation.validate_plain_call`) and the op's."""
    calls = []
    real = validation.validate
    counting = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(api, "validate", counting)
    monkeypatch.setattr(validation, "validate", counting)
    return calls


CAUSAL_CALL = dict(num_heads=4, num_key_value_heads=2, input_layout="BSND", sparse_mode=3, atten_mask=MASK)


def test_public_call_validates_once(monkeypatch):
    """The public function validates once, whether it runs the implementation itself or through the op (here
    under a dispatch mode), whose implementation then takes the problem validated for the same arguments; the op
    called directly validates its own."""
    calls = _counting_validate(monkeypatch)
    q, k, v = make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float32)
    out = npu_prompt_flash_attention(q, k, v, actual_seq_lengths=torch.tensor([8, 5]), **CAUSAL_CALL)
    assert len(calls) == 1
    ops = count_ops(lambda: npu_prompt_flash_attention(q, k, v, actual_seq_lengths=torch.tensor([8, 5]),
                                                       **CAUSAL_CALL))
    assert len(calls) == 2 and ops.get("vllm_pfa.npu_prompt_flash_attention.default") == 1
    direct = torch.ops.vllm_pfa.npu_prompt_flash_attention(q, k, v, actual_seq_lengths=[8, 5], **CAUSAL_CALL)
    assert len(calls) == 3
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    assert api._handoff.call is None


def test_plain_eager_call_skips_only_a_dispatcher_with_nothing_to_do(monkeypatch):
    """CPU arguments in eager mode with no dispatch mode, subclass, functorch transform or autograd run the
    implementation directly; a dispatch mode or a tensor requiring grad still sends the call through the op."""
    through_op = []
    real = api._handed_over
    monkeypatch.setattr(api, "_handed_over", lambda *args: through_op.append(1) or real(*args))
    q, k, v = make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float32)
    plain = npu_prompt_flash_attention(q, k, v, **CAUSAL_CALL)
    assert not through_op
    ops = count_ops(lambda: npu_prompt_flash_attention(q, k, v, **CAUSAL_CALL))
    assert ops.get("vllm_pfa.npu_prompt_flash_attention.default") == 1 and len(through_op) == 1
    with_grad = npu_prompt_flash_attention(q.clone().requires_grad_(), k, v, **CAUSAL_CALL)
    assert len(through_op) == 2 and with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), plain, rtol=0, atol=0)


class _ChangesKvHeads(TorchDispatchMode):
    """A dispatch mode that calls the op with other arguments than the public function validated."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.vllm_pfa.npu_prompt_flash_attention.default:
            kwargs["num_key_value_heads"] = 3
        return func(*args, **kwargs)


def test_op_validates_arguments_a_dispatch_mode_changed():
    q, k, v = make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float32)
    message = r"num_key_value_heads = 3 is invalid: key/value N axis is 2"
    with _ChangesKvHeads(), pytest.raises(ValueError, match=message):
        npu_prompt_flash_attention(q, k, v, **CAUSAL_CALL)
    assert api._handoff.call is None


ARGUMENT_FORMS = {
    # What the dispatcher converts for torch_npu to the number it holds (validation.py, "the argument forms").
    "num_heads numpy": dict(num_heads=np.int64(4)),
    "num_heads 0-d tensor": dict(num_heads=torch.tensor(4)),
    "kv heads numpy": dict(num_key_value_heads=np.int32(2)),
    "sparse_mode numpy": dict(sparse_mode=np.uint8(3)),
    "next_tokens 0-d tensor": dict(next_tokens=torch.tensor(0, dtype=torch.int16)),
    "lengths numpy elements": dict(actual_seq_lengths=[np.int64(8), np.int32(5)]),
    "lengths 0-d tensor elements": dict(actual_seq_lengths=(torch.tensor(8), torch.tensor(5))),
    "lengths numpy array": dict(actual_seq_lengths=np.array([8, 5], dtype=np.int32)),
    "scale numpy float32": dict(scale_value=np.float32(0.25)),
    "scale numpy float16": dict(scale_value=np.float16(0.25)),
    "scale 0-d bf16 tensor": dict(scale_value=torch.tensor(0.25, dtype=torch.bfloat16)),
    "scale int": dict(scale_value=1, expected_scale=1.0),
    "scale numpy int": dict(scale_value=np.int64(2), expected_scale=2.0),
    "scale 0-d int tensor": dict(scale_value=torch.tensor(2), expected_scale=2.0),
}


@pytest.mark.parametrize("call", ["public function", "dispatcher"])
@pytest.mark.parametrize("form", sorted(ARGUMENT_FORMS))
def test_argument_forms_torch_npu_takes(form, call):
    """Each gives the output of the plain int or float it stands for, through the public function and through the
    dispatcher (our op has torch_npu's schema, so this is how torch_npu's function converts it)."""
    q, k, v = make_qkv("BSND", 2, 4, 2, 8, 8, 16, torch.float32)
    given = dict(ARGUMENT_FORMS[form])
    plain = {**CAUSAL_CALL, "actual_seq_lengths": [8, 5], "scale_value": given.pop("expected_scale", 0.25)}
    expected = npu_prompt_flash_attention(q, k, v, **plain)
    function = (npu_prompt_flash_attention if call == "public function"
                else torch.ops.vllm_pfa.npu_prompt_flash_attention)
    torch.testing.assert_close(function(q, k, v, **{**plain, **given}), expected, rtol=0, atol=0)

"""Argument checking for npu_prompt_flash_attention.

Every constraint of the operator's documentation (A2/A3 products) is checked here, before any compute, and answered
with an error naming the parameter, the value and the rule. `validate` returns the normalized problem that the
implementations (reference, fast path) and the fake (meta) implementation share.

Every tensor argument must be on the query's device: a tensor elsewhere (a `meta` mask next to CPU q/k/v, say)
would make the dispatcher pick another kernel than the query's. Under `torch.compile`, int arguments may arrive as
`torch.SymInt` (Dynamo makes an int that changed between calls symbolic): they are accepted, and the range checks
on them install guards, so a later value outside the range recompiles and is rejected there.

The argument forms. torch_npu (2.10) exports `torch.ops.npu.<op>` as `torch_npu.<op>`, so on an NPU the dispatcher
converts the arguments: an int takes an int, a numpy integer or a 0-d integer tensor, a float any real number or 0-d
integer or floating point tensor, an int list a list or tuple of ints or a 1-D integer numpy array; all are taken
here too, as the number they hold. What only a mistake passes, the dispatcher converts as well (silently, but for a
warning on a tensor needing grad), and it is refused here: bools (as 1 or 0: alone, in a list, in an array or a
tensor), floats and float tensors for an int (truncated), tensors and arrays of one element but more dimensions,
bytes for a str, a tensor needing grad for a float. Lengths also take 1-D integer tensors (made lists before
torch_npu).
"""

import functools
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_pfa.ops.layout import LAYOUTS, dims, output_shape, rows_at_unit_stride

MAX_HEADS = 256
MAX_HEAD_DIM = 512
MAX_HIDDEN_BSH_BSND = 65535  # N*D must be smaller than this for BSH/BSND
MAX_GQA_RATIO = 64
MAX_BATCH = 65536
MAX_BATCH_UNALIGNED_D = 128  # batch limit when D is not 32-byte aligned
MAX_SEQ = 20971520
COMPRESSED_MASK_SIZE = 2048
SPARSE_MODES = (0, 1, 2, 3, 4)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32: a CPU convenience, not on the NPU
INPUT_DTYPES = FLOAT_DTYPES + (torch.int8,)
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
DEQ_SCALE_DTYPES = (torch.uint64, torch.float32)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
QUANT_ARGUMENTS = ("deq_scale1", "quant_scale1", "deq_scale2", "quant_scale2", "quant_offset2")


def fail(param: str, value: object, rule: str, error: type[Exception] = ValueError) -> Exception:
    return error(f"npu_prompt_flash_attention: {param} = {_concrete(value)} is invalid: {rule}")


def _concrete(value: object) -> object:
    """Symbolic ints (graph mode) as their values, for an error message: specializing on them there is harmless,
    and Dynamo cannot format a symbolic one (to which `isinstance(value, int)` answers True)."""
    if isinstance(value, tuple):
        return tuple(_concrete(item) for item in value)
    return int(value) if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) else value


def _describe(tensor: torch.Tensor) -> str:
    return f"Tensor(shape={list(tensor.shape)}, dtype={tensor.dtype})"


@dataclass(frozen=True)
class PFAProblem:
    """The normalized problem: sizes, per-batch actual lengths and output type."""

    layout: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_seq: int
    kv_seq: int
    actual_q: tuple[int, ...]
    actual_kv: tuple[int, ...]
    sparse_mode: int
    pre_tokens: int
    next_tokens: int
    scale_value: float
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _check_tensor(name: str, tensor: object, allowed_dtypes: Sequence[torch.dtype] | None, optional: bool,
                  device: torch.device | None = None, rows_only: bool = False) -> None:
    """Type, device (when given), dtype and contiguity (`rows_only`: of the last axis only); `allowed_dtypes` None
    checks type and device only."""
    if tensor is None:
        if optional:
            return
        raise fail(name, None, "a Tensor is required", TypeError)
    if not isinstance(tensor, torch.Tensor):
        raise fail(name, type(tensor).__name__, "must be a torch.Tensor", TypeError)
    if device is not None and tensor.device != device:
        raise fail(f"{name}.device", tensor.device, f"must equal query.device = {device}")
    if allowed_dtypes is None:
        return
    if tensor.dtype not in allowed_dtypes:
        raise fail(f"{name}.dtype", tensor.dtype, f"must be one of {[str(d) for d in allowed_dtypes]}", TypeError)
    if rows_only:
        if not rows_at_unit_stride(tensor):
            raise fail(name, _describe(tensor), "the last axis must have stride 1")
    elif not tensor.is_contiguous():
        raise fail(name, _describe(tensor), "non-contiguous tensors are not supported")


def _zero_dim_tensor(value: object, kinds: str) -> bool:
    """A 0-d tensor whose dtype is of one of `kinds` ("i": integer, "f": floating point), holding a value."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.is_meta or value.requires_grad:
        return False
    if value.dtype == torch.bool or value.is_complex():
        return False
    return ("f" if value.is_floating_point() else "i") in kinds


def check_int(name: str, value: object, low: int = INT64_MIN, high: int = INT64_MAX) -> int | torch.SymInt:
    """An int argument: an int, a numpy integer or a 0-d integer tensor, returned as an int (the argument forms)."""
    if type(value) is not int and not isinstance(value, torch.SymInt):  # plain ints skip the ABC checks (per call)
        if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or _zero_dim_tensor(value, "i")):
            raise fail(name, repr(value), "must be an int", TypeError)
        value = int(value)
    if not low <= value <= high:  # on a SymInt: a guard
        raise fail(name, value, f"must be in [{low}, {high}]")
    return value


def _check_float(name: str, value: object) -> float | torch.SymFloat:
    """A float argument: a real number (numpy integers and floats included) or a 0-d integer or floating point
    tensor, never a bool; returned as a float (the argument forms)."""
    if type(value) is float or isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _zero_dim_tensor(value, "if")):
        raise fail(name, repr(value), "must be a float", TypeError)
    return float(value)


_LENGTHS_RULE = "must be None, a list or tuple of ints, or a 1-D integer tensor or numpy array"


def _numpy_array(value: object) -> bool:
    numpy = sys.modules.get("numpy")  # torch runs without numpy; where it is not imported, no array exists
    return numpy is not None and isinstance(value, numpy.ndarray)


def lengths_list(name: str, lengths: object, device: torch.device | None) -> list | None:
    """actual_seq_lengths(_kv) as a list (elements unchecked): None, a list/tuple, a 1-D integer numpy array, or a
    1-D integer tensor on `device` (any device when None)."""
    if lengths is None or isinstance(lengths, (list, tuple)):
        return None if lengths is None else list(lengths)
    if _numpy_array(lengths) and lengths.ndim == 1 and lengths.dtype.kind in "iu":
        return lengths.tolist()
    if not isinstance(lengths, torch.Tensor):
        raise fail(name, repr(lengths), _LENGTHS_RULE, TypeError)
    integral = not (lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool)
    if lengths.dim() != 1 or not integral:
        raise fail(name, _describe(lengths), _LENGTHS_RULE, TypeError)
    if device is not None and lengths.device != device:
        raise fail(f"{name}.device", lengths.device, f"must equal query.device = {device}")
    if lengths.is_meta:
        raise fail(name, f"{_describe(lengths)} on meta", "a meta tensor holds no values to read lengths from")
    return lengths.tolist()


def _actual_lengths(name: str, lengths: object, device: torch.device, batch: int, seq: int,
                    seq_name: str) -> tuple[int, ...]:
    """Per-batch lengths: None means S; one value broadcasts; >= B values use the first B."""
    lengths = lengths_list(name, lengths, device)
    if lengths is None:
        return (seq,) * batch
    if len(lengths) != 1 and len(lengths) < batch:
        raise fail(f"len({name})", len(lengths), f"must be 1 or >= B = {batch}")
    values = [check_int(f"{name}[{i}]", v) for i, v in enumerate(lengths)]
    for i, value in enumerate(values[:batch]):
        if not 0 <= value <= seq:
            raise fail(f"{name}[{i}]", value, f"must be in [0, {seq_name} = {_concrete(seq)}]")
    return tuple(values * batch) if len(values) == 1 else tuple(values[:batch])


def _check_qkv(query, key, value, layout: str, num_heads: int, num_key_value_heads: int, rows_only: bool):
    _check_tensor("query", query, INPUT_DTYPES, optional=False, rows_only=rows_only)
    _check_tensor("key", key, INPUT_DTYPES, optional=False, device=query.device, rows_only=rows_only)
    _check_tensor("value", value, INPUT_DTYPES, optional=False, device=query.device, rows_only=rows_only)
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype:
            raise fail(f"{name}.dtype", tensor.dtype, f"must equal query.dtype = {query.dtype}", TypeError)
    ndim = 3 if layout == "BSH" else 4
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != ndim:
            raise fail(f"{name}.shape", list(tensor.shape), f"input_layout {layout} needs a {ndim}-D tensor")
    if key.shape != value.shape:
        raise fail("value.shape", list(value.shape), f"must equal key.shape = {list(key.shape)}")
    if layout == "BSH" and query.shape[2] % num_heads:
        raise fail("query.shape", list(query.shape),
                   f"H = {query.shape[2]} must be divisible by num_heads = {num_heads}")
    batch, n, q_seq, head_dim = dims(query.shape, layout, num_heads)
    if layout != "BSH" and n != num_heads:
        raise fail("num_heads", num_heads, f"must equal query's N axis = {n} for input_layout {layout}")
    kv_heads = num_key_value_heads or num_heads
    if layout == "BSH":
        if key.shape[2] != kv_heads * head_dim:
            raise fail(
                "key.shape", list(key.shape),
                f"H of key must be num_key_value_heads * D = {kv_heads} * {head_dim} = {kv_heads * head_dim}",
            )
        kv_batch, _, kv_seq, _ = dims(key.shape, layout, kv_heads)
    else:
        kv_batch, kv_n, kv_seq, kv_dim = dims(key.shape, layout, kv_heads)
        if kv_n != kv_heads:
            raise fail(
                "num_key_value_heads", num_key_value_heads,
                f"key/value N axis is {kv_n} but num_key_value_heads means {kv_heads} (0 means num_heads)",
            )
        if kv_dim != head_dim:
            raise fail("key.shape", list(key.shape), f"D of key must equal D of query = {head_dim}")
    if kv_batch != batch:
        raise fail("key.shape", list(key.shape), f"B of key must equal B of query = {batch}")
    return batch, kv_heads, q_seq, kv_seq, head_dim


def check_heads(num_heads: int, kv_heads: int, head_dim: int, layout: str) -> None:
    """The spec's limits on a layer's head configuration (`kv_heads` resolved: 0 already means num_heads). The
    operator checks them per call; the backends at start-up, with their per-rank heads, since on an NPU the
    operator hands its arguments to torch_npu unchecked."""
    check_int("num_heads", num_heads, 1, MAX_HEADS)
    check_int("num_key_value_heads", kv_heads, 1, MAX_HEADS)
    if num_heads % kv_heads:
        raise fail(
            "num_key_value_heads", kv_heads,
            f"numHeads({num_heads}) must be divisible by numKeyValueHeads({kv_heads})",
        )
    if num_heads // kv_heads > MAX_GQA_RATIO:
        raise fail(
            "num_key_value_heads", kv_heads,
            f"numHeads / numKeyValueHeads = {num_heads // kv_heads}, cannot be larger than {MAX_GQA_RATIO}",
        )
    if head_dim > MAX_HEAD_DIM:
        raise fail("D", head_dim, f"d should <= {MAX_HEAD_DIM}")
    if layout in ("BSH", "BSND") and num_heads * head_dim >= MAX_HIDDEN_BSH_BSND:
        raise fail("N*D", num_heads * head_dim, f"must be < {MAX_HIDDEN_BSH_BSND} for input_layout {layout}")


def _check_sizes(query, layout, batch, num_heads, kv_heads, q_seq, kv_seq, head_dim) -> None:
    check_heads(num_heads, kv_heads, head_dim, layout)
    if batch > MAX_BATCH:
        raise fail("B", batch, f"must be <= {MAX_BATCH}")
    if (head_dim * query.element_size()) % 32 and batch > MAX_BATCH_UNALIGNED_D:
        raise fail("B", batch, f"must be <= {MAX_BATCH_UNALIGNED_D} when D ({head_dim}) is not 32-byte aligned")
    for name, seq in (("query S", q_seq), ("key/value S", kv_seq)):
        if seq > MAX_SEQ:
            raise fail(name, seq, f"must be <= {MAX_SEQ}")


def _check_mask(atten_mask, sparse_mode: int, batch: int, q_seq: int, kv_seq: int, device: torch.device) -> None:
    _check_tensor("atten_mask", atten_mask, MASK_DTYPES, optional=True, device=device)
    shape = None if atten_mask is None else list(atten_mask.shape)
    if sparse_mode in (2, 3, 4):
        size = COMPRESSED_MASK_SIZE
        if shape not in ([size, size], [1, size, size], [1, 1, size, size]):
            raise fail(
                "atten_mask", shape,
                f"attenMask shape must be ({size}, {size}) or (1, {size}, {size}) or (1, 1, {size}, {size}) "
                f"when sparse mode = {sparse_mode}",
            )
        return
    if atten_mask is None:
        if sparse_mode == 1:
            raise fail("atten_mask", None, "sparse_mode = 1 (allMask) needs atten_mask")
        return
    rule = (
        f"must be (>={q_seq}, >={kv_seq}), (1 or B={batch}, >={q_seq}, >={kv_seq}) "
        f"or (1 or B={batch}, 1, >={q_seq}, >={kv_seq})"
    )
    ok = atten_mask.dim() in (2, 3, 4) and shape[-2] >= q_seq and shape[-1] >= kv_seq
    ok = ok and (atten_mask.dim() == 2 or shape[0] in (1, batch))
    ok = ok and (atten_mask.dim() != 4 or shape[1] == 1)
    if not ok:
        raise fail("atten_mask.shape", shape, rule)


def _check_pse(pse_shift, query_dtype, query_device, batch, num_heads, q_seq, kv_seq) -> None:
    if pse_shift is None:
        return
    allowed = {
        torch.float16: (torch.float16,),
        torch.int8: (torch.float16,),
        torch.bfloat16: (torch.bfloat16,),
        torch.float32: (torch.float32,),
    }[query_dtype]
    _check_tensor("pse_shift", pse_shift, allowed, optional=False, device=query_device)
    shape = list(pse_shift.shape)
    if not (
        pse_shift.dim() == 4 and shape[0] in (1, batch) and shape[1] == num_heads
        and shape[2] >= q_seq and shape[3] >= kv_seq
    ):
        raise fail(
            "pse_shift.shape", shape,
            f"pse shift shape must be [1 or B={batch}, N={num_heads}, >=Sq={q_seq}, >=Skv={kv_seq}]",
        )


def _check_quant(query, layout, num_heads, head_dim, deq_scale1, quant_scale1, deq_scale2, quant_scale2,
                 quant_offset2) -> torch.dtype:
    """Checks the int8 parameter combinations; returns the output dtype."""
    _check_tensor("deq_scale1", deq_scale1, DEQ_SCALE_DTYPES, optional=True, device=query.device)
    _check_tensor("quant_scale1", quant_scale1, (torch.float32,), optional=True, device=query.device)
    _check_tensor("deq_scale2", deq_scale2, DEQ_SCALE_DTYPES, optional=True, device=query.device)
    out_scale_dtypes = (torch.float32, torch.bfloat16) if query.dtype == torch.bfloat16 else (torch.float32,)
    _check_tensor("quant_scale2", quant_scale2, out_scale_dtypes, optional=True, device=query.device)
    _check_tensor("quant_offset2", quant_offset2, out_scale_dtypes, optional=True, device=query.device)
    for name, scale in (("deq_scale1", deq_scale1), ("quant_scale1", quant_scale1), ("deq_scale2", deq_scale2)):
        if scale is not None and scale.numel() != 1:
            raise fail(f"{name}.shape", list(scale.shape), "only per-tensor (one element) is supported")
    input_scales = {"deq_scale1": deq_scale1, "quant_scale1": quant_scale1, "deq_scale2": deq_scale2}
    if query.dtype == torch.int8:
        for name, scale in input_scales.items():
            if scale is None:
                raise fail(name, None, "an int8 query needs deq_scale1, quant_scale1 and deq_scale2")
        if quant_scale2 is None and quant_offset2 is not None:
            raise fail("quant_offset2", _describe(quant_offset2),
                       "int8 input with float16 output: quant_offset2 needs quant_scale2")
    else:
        for name, scale in input_scales.items():
            if scale is not None:
                raise fail(name, _describe(scale), f"must be None for a {query.dtype} query")
        if quant_scale2 is None and quant_offset2 is not None:
            raise fail("quant_offset2", _describe(quant_offset2), "given without quant_scale2")
    if quant_scale2 is None:
        return torch.float16 if query.dtype == torch.int8 else query.dtype
    if quant_offset2 is not None and (
        quant_offset2.dtype != quant_scale2.dtype or quant_offset2.shape != quant_scale2.shape
    ):
        raise fail("quant_offset2", _describe(quant_offset2),
                   f"must have quant_scale2's dtype and shape ({_describe(quant_scale2)})")
    channels = num_heads * head_dim
    if quant_scale2.numel() not in (1, channels):
        raise fail(
            "quant_scale2.shape", list(quant_scale2.shape),
            f"per-tensor needs 1 element, per-channel {'H' if layout == 'BSH' else 'N*D'} = {channels} elements",
        )
    if quant_scale2.numel() == channels and channels != 1 and (head_dim * query.element_size()) % 32:
        raise fail("quant_scale2.shape", list(quant_scale2.shape),
                   f"per-channel output quantization needs D ({head_dim}) 32-byte aligned")
    return torch.int8


def _check_int8_output_rows(problem: PFAProblem, has_mask: bool, has_offset: bool) -> None:
    """With int8 output, modes/lengths that leave rows uncomputed are rejected (the operator intercepts them)."""
    mode, pre, nxt = problem.sparse_mode, problem.pre_tokens, problem.next_tokens
    if mode == 4 and (pre < 0 or nxt < 0):
        raise fail("pre_tokens/next_tokens", (pre, nxt), "int8 output does not support band mode with negative values")
    if not has_offset:
        return
    for b, (aq, akv) in enumerate(zip(problem.actual_q, problem.actual_kv)):
        broken = (
            (mode == 0 and has_mask and (aq - akv - pre > 0 or nxt < 0))
            or (mode == 3 and akv - aq < 0)
            or (mode == 4 and nxt + akv - aq < 0)
        )
        if broken:
            raise fail(
                f"batch {b} (actual_seq_lengths={_concrete(aq)}, actual_seq_lengths_kv={_concrete(akv)})", (pre, nxt),
                f"with int8 output and quant_offset2, sparse_mode = {mode} would leave rows uncomputed",
            )


def validate(
    query, key, value, *, pse_shift, padding_mask, atten_mask, actual_seq_lengths, deq_scale1, quant_scale1, deq_scale2,
    quant_scale2, quant_offset2, num_heads, scale_value, pre_tokens, next_tokens, input_layout,
    num_key_value_heads, actual_seq_lengths_kv, sparse_mode, strided_qkv: bool = False,
) -> PFAProblem:
    """The problem the op's arguments describe, or the error naming the parameter, its value and the rule.
    `strided_qkv`: query, key and value may have any strides but the last (the native kernel's direct call reads
    rows at any stride; the op itself takes contiguous tensors only)."""
    if not isinstance(input_layout, str):
        raise fail("input_layout", repr(input_layout), "must be a str", TypeError)
    if input_layout not in LAYOUTS:
        raise fail("input_layout", repr(input_layout), f"must be one of {list(LAYOUTS)}")
    num_heads = check_int("num_heads", num_heads, 1, MAX_HEADS)
    num_key_value_heads = check_int("num_key_value_heads", num_key_value_heads, 0, MAX_HEADS)
    pre_tokens = check_int("pre_tokens", pre_tokens)
    next_tokens = check_int("next_tokens", next_tokens)
    sparse_mode = check_int("sparse_mode", sparse_mode)
    if sparse_mode not in SPARSE_MODES:
        mode = _concrete(sparse_mode)
        raise fail("sparse_mode", mode, f"sparse_mode = {mode} is out of range (supported: 0..4)")
    scale_value = _check_float("scale_value", scale_value)
    batch, kv_heads, q_seq, kv_seq, head_dim = _check_qkv(
        query, key, value, input_layout, num_heads, num_key_value_heads, strided_qkv
    )
    _check_sizes(query, input_layout, batch, num_heads, kv_heads, q_seq, kv_seq, head_dim)
    _check_tensor("padding_mask", padding_mask, None, optional=True, device=query.device)  # reserved, never read
    _check_mask(atten_mask, sparse_mode, batch, q_seq, kv_seq, query.device)
    _check_pse(pse_shift, query.dtype, query.device, batch, num_heads, q_seq, kv_seq)
    out_dtype = _check_quant(
        query, input_layout, num_heads, head_dim, deq_scale1, quant_scale1, deq_scale2, quant_scale2, quant_offset2
    )
    if query.dtype == torch.int8 and (query.numel() == 0 or key.numel() == 0):
        raise fail("query/key", (list(query.shape), list(key.shape)), "int8 inputs must not be empty")
    problem = PFAProblem(
        layout=input_layout, batch=batch, num_heads=num_heads, num_kv_heads=kv_heads, head_dim=head_dim,
        q_seq=q_seq, kv_seq=kv_seq,
        actual_q=_actual_lengths("actual_seq_lengths", actual_seq_lengths, query.device, batch, q_seq, "query S"),
        actual_kv=_actual_lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, query.device, batch, kv_seq,
                                  "key/value S"),
        sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens, scale_value=float(scale_value),
        out_shape=output_shape(query.shape, input_layout), out_dtype=out_dtype,
    )
    if out_dtype == torch.int8:
        _check_int8_output_rows(problem, atten_mask is not None, quant_offset2 is not None)
    return problem


# The public function's validations by the arguments' signature (`validate_plain_call`): validation reads a tensor's
# type, dtype, device, sizes and strides, and the other arguments' types and values, nothing else, so equal signatures
# have one outcome. Validating costs ~30 us of a 0.5 ms call where Python's code runs out of cache, between other
# kernels (fp32 9/3 heads D64 S=256); a call found here, a native signature and a lookup. Bounded: cleared when full.
MAX_VALIDATED = 256
_validated: dict[tuple, PFAProblem] = {}
_TENSOR = "tensor"  # a tensor argument's place in the key (its metadata is in the tensor signature)
# The tensor parameters besides query, key and value: their values are never read by validation.
TENSOR_PARAMETERS = frozenset(("padding_mask", "atten_mask", "pse_shift", *QUANT_ARGUMENTS))


@functools.cache
def _tensor_signature():
    """`_C.tensor_signature`, or None where the extension is not built (every call then validated in full)."""
    try:
        from vllm_pfa import _C
    except ImportError:
        return None
    return _C.tensor_signature


def _plain_signature(query, key, value, arguments: dict) -> tuple | None:
    """The memo key of a call whose tensors (q, k, v and TENSOR_PARAMETERS) are plain torch.Tensors and other
    arguments plain ints, floats (not NaN), strs, None, or lists or tuples of plain ints; None for any other call
    (bools, numpy values, 0-d or length tensors, whose values validation reads, symbolic ints: validated in full).
    Floats are tagged, as 0 and 0.0 validate differently."""
    tensor_signature = _tensor_signature()
    if tensor_signature is None:
        return None
    tensors, values = [query, key, value], []
    for name, argument in arguments.items():
        kind = type(argument)
        if kind is torch.Tensor and name in TENSOR_PARAMETERS:  # not an int, float or lengths given as a tensor
            tensors.append(argument)
            values.append(_TENSOR)
        elif kind is int or kind is str or argument is None:
            values.append(argument)
        elif kind is float and argument == argument:
            values.append(("float", argument))
        elif (kind is list or kind is tuple) and all(type(item) is int for item in argument):
            values.append(tuple(argument))
        else:
            return None
    signature = tensor_signature(tensors)
    return None if signature is None else (signature, tuple(arguments), tuple(values))


def validate_plain_call(query, key, value, arguments: dict) -> PFAProblem:
    """`validate(query, key, value, **arguments)`, remembered for plain calls (`_plain_signature`); errors are raised
    on every call, as they are never remembered."""
    signature = _plain_signature(query, key, value, arguments)
    problem = None if signature is None else _validated.get(signature)
    if problem is None:
        problem = validate(query, key, value, **arguments)
        if signature is not None:
            if len(_validated) >= MAX_VALIDATED:
                _validated.clear()
            _validated[signature] = problem
    return problem

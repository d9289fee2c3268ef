"""`npu_prompt_flash_attention`: torch_npu's signature and semantics, on any device.

The public function validates, then dispatches: NPU tensors go to `torch_npu.npu_prompt_flash_attention`; everything
else to the `vllm_pfa::npu_prompt_flash_attention` custom op, whose CPU implementation runs the fast path for float
inputs and the exact reference for int8 (an eager CPU call the dispatcher would only pass on runs that
implementation directly). The op has a fake implementation, so it traces under `torch.compile(fullgraph=True)`.
"""

import importlib
import inspect
import threading
from collections.abc import Sequence
from typing import Union

import torch
from torch.overrides import has_torch_function
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from vllm_pfa.ops import fast_path
from vllm_pfa.ops.reference import reference_prompt_flash_attention
from vllm_pfa.ops.validation import QUANT_ARGUMENTS, PFAProblem, lengths_list, validate, validate_plain_call

OP_NAME = "vllm_pfa::npu_prompt_flash_attention"
DEFAULT_PRE_TOKENS = 2147483647  # torch_npu registers this; the spec's prototype line (2147473647) is a typo

# numpy, optional beside torch, named as a forward reference: where it is not installed no array is passed
IntList = Union[Sequence[int], torch.Tensor, "numpy.ndarray", None]

# The public function validates first (before the dispatcher converts what it is given), then calls the op, whose
# implementation must validate what it is given, as it may be called directly. When the op receives exactly the
# arguments the public function validated (the same tensors, equal values), the problem found first is handed over
# instead of validated twice: 12-18 us a call, 14-16% of a call at S=8 (benchmarks/kernel_performance.md, "Where
# S=512 loses to its surroundings"). Per thread: calls on other threads never see it.
_handoff = threading.local()


def runs_on_npu(query: torch.Tensor) -> bool:
    """Whether the operator hands this query to torch_npu (the one dispatch decision; callers that prepare its
    inputs, e.g. the backend's packing, ask the same question)."""
    return query.device.type == "npu"


def npu_prompt_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    pse_shift: torch.Tensor | None = None,
    actual_seq_lengths: IntList = None,
    deq_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    deq_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    pre_tokens: int = DEFAULT_PRE_TOKENS,
    next_tokens: int = 0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    actual_seq_lengths_kv: IntList = None,
    sparse_mode: int = 0,
) -> torch.Tensor:
    """Prompt Flash Attention (full-sequence FA) with torch_npu's contract; see the operator spec."""
    kwargs = dict(
        padding_mask=padding_mask, atten_mask=atten_mask, pse_shift=pse_shift, actual_seq_lengths=actual_seq_lengths,
        deq_scale1=deq_scale1, quant_scale1=quant_scale1, deq_scale2=deq_scale2, quant_scale2=quant_scale2,
        quant_offset2=quant_offset2, num_heads=num_heads, scale_value=scale_value, pre_tokens=pre_tokens,
        next_tokens=next_tokens, input_layout=input_layout, num_key_value_heads=num_key_value_heads,
        actual_seq_lengths_kv=actual_seq_lengths_kv, sparse_mode=sparse_mode,
    )
    on_npu = isinstance(query, torch.Tensor) and runs_on_npu(query)
    if not on_npu:
        # Checked before the dispatcher: it refuses ill-typed arguments with a less precise message, and converts
        # some that are refused here (bools for ints; validation.py, "the argument forms").
        compiling = torch.compiler.is_compiling()
        problem = validate(query, key, value, **kwargs) if compiling else validate_plain_call(query, key, value, kwargs)
        if not compiling and _dispatcher_only_calls_the_implementation(query, key, value, kwargs):
            return _compute(query, key, value, problem, kwargs)  # the lengths as the problem holds them
    # torch_npu and the op's schema take int lists; torch_npu checks its own arguments' devices.
    for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
        kwargs[name] = lengths_list(name, kwargs[name], None if on_npu else query.device)
    if on_npu:
        torch_npu = importlib.import_module("torch_npu")
        return torch_npu.npu_prompt_flash_attention(query, key, value, **kwargs)
    if torch.compiler.is_compiling():  # the graph calls the op on its own at run time: nothing to hand over
        return torch.ops.vllm_pfa.npu_prompt_flash_attention(query, key, value, **kwargs)
    _handoff.call = (query, key, value, kwargs, problem)
    try:
        return torch.ops.vllm_pfa.npu_prompt_flash_attention(query, key, value, **kwargs)
    finally:
        _handoff.call = None


def _dispatcher_only_calls_the_implementation(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                              kwargs: dict) -> bool:
    """Whether the dispatcher, for these CPU arguments, would do nothing but call the implementation: eager, no
    dispatch or function mode (tracing, fake tensors), no tensor subclass, functorch transform or autograd. The
    public function then calls the implementation itself, sparing the dispatcher's boxing of 20 arguments there and
    back (Zen 4: bf16 MHA D64 S=8 76 -> 60 us a call; fp32 9/3 heads D64 S=256 right after a 32 MiB write 932 -> 730
    us; between bench-op's other kernels within its noise). Every other call still goes through the op."""
    if query.device.type != "cpu" or is_in_torch_dispatch_mode():
        return False
    tensors = [query, key, value, *(arg for arg in kwargs.values() if isinstance(arg, torch.Tensor))]
    if has_torch_function(tensors):
        return False
    grad = torch.is_grad_enabled()
    return not any((grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _handed_over(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> PFAProblem | None:
    """The problem the public function validated, if these are its arguments (a dispatch mode may pass others)."""
    call = getattr(_handoff, "call", None)
    if call is None or call[0] is not query or call[1] is not key or call[2] is not value:
        return None
    validated = call[3]
    for name, given in kwargs.items():
        other = validated[name]
        if other is not given and (isinstance(other, torch.Tensor) or isinstance(given, torch.Tensor)
                                   or other != given):
            return None
    return call[4]


def _prompt_flash_attention_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    pse_shift: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    deq_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    deq_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    pre_tokens: int = DEFAULT_PRE_TOKENS,
    next_tokens: int = 0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    actual_seq_lengths_kv: list[int] | None = None,
    sparse_mode: int = 0,
) -> torch.Tensor:
    """The op's CPU (and any non-NPU) implementation; its signature is the op's schema."""
    kwargs = dict(locals())
    del kwargs["query"], kwargs["key"], kwargs["value"]
    problem = _handed_over(query, key, value, kwargs) or validate(query, key, value, **kwargs)
    return _compute(query, key, value, problem, kwargs)


def _compute(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, problem: PFAProblem,
             kwargs: dict) -> torch.Tensor:
    """The result of a validated problem (`kwargs`: the op's keyword arguments)."""
    if query.numel() == 0:
        return query.new_empty(problem.out_shape, dtype=problem.out_dtype)
    if fast_path.handles(query, kwargs["quant_scale2"]):
        return fast_path.fast_prompt_flash_attention(
            query, key, value, problem, pse_shift=kwargs["pse_shift"], atten_mask=kwargs["atten_mask"]
        )
    quant = {name: kwargs[name] for name in QUANT_ARGUMENTS}
    return reference_prompt_flash_attention(query, key, value, problem, pse_shift=kwargs["pse_shift"],
                                            atten_mask=kwargs["atten_mask"], **quant)


_OP_SIGNATURE = inspect.signature(_prompt_flash_attention_impl)
# torch_npu's schema makes every argument after `value` keyword-only, Tensors included; `torch.library.custom_op`
# refuses keyword-only Tensors, so the op is defined with the lower-level calls (the schema still inferred from the
# implementation's signature; "default" is the CompositeExplicitAutograd kernel custom_op would register).
torch.library.define(OP_NAME, torch.library.infer_schema(_prompt_flash_attention_impl, mutates_args=()),
                     tags=(torch.Tag.pt2_compliant_tag,))
torch.library.impl(OP_NAME, "default", _prompt_flash_attention_impl)


@torch.library.register_fake(OP_NAME)
def _prompt_flash_attention_fake(*args, **kwargs):
    """Output shape and dtype only, after the same validation as the real implementation."""
    bound = _OP_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    query, key, value = (bound.arguments.pop(name) for name in ("query", "key", "value"))
    problem = validate(query, key, value, **bound.arguments)
    return query.new_empty(problem.out_shape, dtype=problem.out_dtype)


_PUBLIC_DEFAULTS = {
    name: param.default for name, param in inspect.signature(npu_prompt_flash_attention).parameters.items()
    if param.kind == inspect.Parameter.KEYWORD_ONLY
}


def reference_npu_prompt_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                         **kwargs) -> torch.Tensor:
    """The exact reference behind the same signature (validation included): the test oracle, on CPU tensors."""
    full = dict(_PUBLIC_DEFAULTS)
    unknown = set(kwargs) - set(full)
    if unknown:
        raise TypeError(f"npu_prompt_flash_attention: unexpected keyword arguments {sorted(unknown)}")
    full.update(kwargs)
    problem = validate(query, key, value, **full)
    quant = {name: full[name] for name in QUANT_ARGUMENTS}
    return reference_prompt_flash_attention(query, key, value, problem, pse_shift=full["pse_shift"],
                                            atten_mask=full["atten_mask"], **quant)

"""torch_npu's released wheel (tests/torch_npu_wheel.py) as the contract: our op's schema and public signature, our
fake implementation's output shape and dtype, and the signatures of the contract suite's torch_npu stand-in.

Skipped, with the reason, only where the pinned wheel cannot be fetched.
"""

import ast
import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_npu_wheel
from pfa_cases import make_qkv
from vllm_pfa.ops import npu_prompt_flash_attention, npu_trans_quant_param
from vllm_pfa.ops.layout import LAYOUTS

PFA = "npu_prompt_flash_attention"
REQUIRED = "<required>"
STANDIN = Path(__file__).parent / "ascend_contract" / "standin" / "torch_npu" / "__init__.py"
# The stand-in's operators, read from its source: importing it would replace torch.npu in this process.
STANDIN_OPS = {node.name: node for node in ast.parse(STANDIN.read_text()).body
               if isinstance(node, ast.FunctionDef) and re.match(r"_?npu_", node.name)}
# query dtype, whether quant_scale2 is given (int8 output)
VARIANTS = {"fp16": (torch.float16, False), "bf16": (torch.bfloat16, False), "fp32": (torch.float32, False),
            "int8": (torch.int8, False), "fp16-quant-out": (torch.float16, True), "int8-quant-out": (torch.int8, True)}


@pytest.fixture(scope="module", autouse=True)
def wheel() -> None:
    try:
        torch_npu_wheel.wheel_file(torch_npu_wheel.SCHEMAS)
    except torch_npu_wheel.Unavailable as exc:
        pytest.skip(f"torch-npu {torch_npu_wheel.VERSION} wheel unavailable: {exc}")


def _default(value) -> str:
    return repr(value)  # repr, so that 1 and 1.0 or 0 and False differ


def _schema_parameters(schema: torch._C.FunctionSchema) -> list[tuple[str, str, str]]:
    """Name, kind (as `inspect` names it) and default of each argument, in order."""
    return [(a.name, "KEYWORD_ONLY" if a.kwarg_only else "POSITIONAL_OR_KEYWORD",
             _default(a.default_value) if a.has_default_value() else REQUIRED) for a in schema.arguments]


def _signature_parameters(signature: inspect.Signature) -> list[tuple[str, str, str]]:
    return [(p.name, p.kind.name, REQUIRED if p.default is p.empty else _default(p.default))
            for p in signature.parameters.values()]


def _printed(schema: torch._C.FunctionSchema) -> str:
    """The schema after its name: types, `*`, defaults, returns. SymInt reads as int: `torch.library` infers SymInt
    from an `int` annotation, which lets torch.compile pass lengths and pre_tokens as symbolic ints (guarded);
    torch_npu registers plain int. From Python both take the same values."""
    return str(schema).split("(", 1)[1].replace("SymInt", "int")


def test_op_schema_is_torch_npus():
    ours = torch.ops.vllm_pfa.npu_prompt_flash_attention.default._schema
    theirs = torch_npu_wheel.registered_schema(PFA)
    assert _schema_parameters(ours) == _schema_parameters(theirs)
    assert _printed(ours) == _printed(theirs)


@pytest.mark.parametrize("function", [npu_prompt_flash_attention, npu_trans_quant_param], ids=lambda f: f.__name__)
def test_public_signature_is_torch_npus(function):
    """Names, order, keyword-only arguments and defaults; the types are wider on purpose (lengths may be tensors, as
    the spec allows) and the op's schema test covers what reaches the op."""
    expected = _schema_parameters(torch_npu_wheel.registered_schema(function.__name__))
    assert _signature_parameters(inspect.signature(function)) == expected


def test_torch_npus_function_is_the_dispatchers_op():
    """torch_npu exports `torch.ops.npu.<op>` as `torch_npu.<op>`: its arguments are converted by the dispatcher, whose
    conversions the operator follows (vllm_pfa/ops/validation.py, "the argument forms"; tests/test_op_validation.py)."""
    source = torch_npu_wheel.wheel_file(torch_npu_wheel.EXPORTS).read_text()
    assert re.search(r"for name in dir\(torch\.ops\.npu\):\n(?:.*\n){0,4}?\s+globals_dict\[name\] = "
                     r"getattr\(torch\.ops\.npu, name\)", source), "torch_npu no longer exports torch.ops.npu's ops"


def _case(layout: str, dtype: torch.dtype, quant_output: bool) -> tuple[tuple[torch.Tensor, ...], dict]:
    """A valid call: GQA 4/2 heads, Sq 8, Skv 12, D 32, with the scales an int8 query needs."""
    q, k, v = make_qkv(layout, 2, 4, 2, 8, 12, 32, dtype)
    kwargs = dict(num_heads=4, num_key_value_heads=2, input_layout=layout)
    if dtype == torch.int8:
        kwargs.update(deq_scale1=npu_trans_quant_param(torch.tensor([0.01])), quant_scale1=torch.tensor([50.0]),
                      deq_scale2=torch.tensor([0.01]))
    if quant_output:
        kwargs["quant_scale2"] = torch.tensor([20.0])
    return (q, k, v), kwargs


def _shape_and_dtype(out: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(out.shape), out.dtype


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_agrees_with_torch_npus_meta_function(layout, variant):
    tensors, kwargs = _case(layout, *VARIANTS[variant])
    meta = {name: value.to("meta") if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    expected = torch_npu_wheel.meta_function(PFA)(*(t.to("meta") for t in tensors), **meta)
    with FakeTensorMode() as mode:
        fake = {name: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                for name, value in kwargs.items()}
        out = torch.ops.vllm_pfa.npu_prompt_flash_attention(*(mode.from_tensor(t) for t in tensors), **fake)
    assert _shape_and_dtype(out) == _shape_and_dtype(expected)


def _standin_signature(function: ast.FunctionDef) -> inspect.Signature:
    """The signature of a stand-in operator, compiled from its definition alone (body and annotations dropped)."""
    header = copy.deepcopy(function)
    header.body, header.decorator_list, header.returns = [ast.Pass()], [], None
    for argument in ast.walk(header.args):
        if isinstance(argument, ast.arg):
            argument.annotation = None
    namespace = {}
    exec(compile(ast.fix_missing_locations(ast.Module([header], type_ignores=[])), str(STANDIN), "exec"), namespace)
    return inspect.signature(namespace[function.name])


@pytest.mark.parametrize("name", sorted(STANDIN_OPS))
def test_standin_operator_has_torch_npus_signature(name):
    """Every operator the stand-in provides (vllm-ascend calls them by keyword and relies on their defaults).
    `_npu_paged_attention` is no `npu::` op: torch_npu's ATB extension registers `atb::_npu_paged_attention`
    (libop_plugin_atb.so) and `torch_npu/op_plugin/atb/_atb_ops.py` sets it on the module as
    `torch_npu._npu_paged_attention`, which vllm-ascend calls."""
    expected = _schema_parameters(torch_npu_wheel.registered_schema(name))
    assert _signature_parameters(_standin_signature(STANDIN_OPS[name])) == expected

"""Fuzz test of the operator (issue 10): wide strategies over every argument.

Every case is either a ValueError/TypeError naming the parameter the case broke, or a result equal to the
reference (NaN and inf at the same places), and, where cheap, the reference equal to the fp64 brute force of
test_op_reference. Cases drawn: all layouts and dtypes (int8 quant parameters included), GQA, every sparse mode,
masks of every accepted shape and dtype, actual lengths as lists, tuples and tensors, pse, pre/next tokens at
their extremes, NaN/inf in q/k/v/pse, scales of either sign, 0, inf and NaN, offset and size-1-restrided tensors
(D = 1 among them), zero-size axes, outputs on pages mapped for them whatever their size, and one deliberate
violation per invalid case. (Scales far from 1/sqrt(D), such as 1e4, are left out: the scores' fp32 rounding then
moves the weights beyond the dtype tolerances on every route, the reference's included.)

The Python paths (reference, blockwise, SDPA, vLLM's kernel) run here with the native kernel switched off. Cases
that reach the native kernel (vllm_pfa._C) run in a subprocess that loops over many seeded cases and reports
failures as JSON, so a crash fails the test instead of killing pytest. Examples are derandomized (reproducible in
CI); `pytest --fuzz-examples=N` runs N per part. A failing case is printed as its spec: `build(spec)` rebuilds it.
"""

import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_subprocess import child_main, run_child
from pfa_cases import counting_native_runs
from test_op_reference import brute_force
from vllm_pfa.check_operator import TOLERANCE  # the dtype tolerances the check uses too
from vllm_pfa.ops import compressed_causal_mask, npu_prompt_flash_attention, npu_trans_quant_param
from vllm_pfa.ops import reference_npu_prompt_flash_attention
from vllm_pfa.ops import native_kernel, sdpa_path, vllm_cpu_kernel

LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
TOKEN_EXTREMES = (2147473647, 2147483647, 2**63 - 1, -(2**63), 65535, 0, 1, 3, -1, -3)
NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
BRUTE_FORCE_BUDGET = 3000  # B * N * Sq * Skv: the fp64 brute force loops in Python
DEFAULT_EXAMPLES = {"python": 200, "native": 80}  # native: per part (finite, non-finite)

# Deliberate violations: (name, the parameter the error must name).
MUTATIONS = ("sparse_mode", "lengths_form", "lengths_range", "lengths_count", "meta_device", "padding_mask",
             "noncontiguous", "expanded_mask", "key_dtype", "kv_heads", "pse_shape", "compressed_mask",
             "int8_scale", "float_scale", "head_dim", "tokens", "num_heads", "scale_value")


# --------------------------------------------------------------------------- strategies: a case is a JSON spec


@st.composite
def cases(draw, native: bool = False, non_finite: bool | None = None):
    """A JSON-able spec of one call. `native`: float band problems the native kernel takes, no violations;
    `non_finite`: whether NaN/inf is injected (None: sometimes).

    Choices come from a seeded `random.Random` hypothesis provides: hypothesis's own draws lean towards their
    minimum (zero-size axes, the first option) and would make the rare choices below rare no more.
    """
    r = draw(st.randoms(use_true_random=True))  # a random.Random seeded by hypothesis
    pick, chance = (lambda *options: r.choice(options)), (lambda p: r.random() < p)
    dtype = pick("float32", "float16", "bfloat16") if native else pick(*DTYPES)
    spec = dict(seed=r.randrange(2**16), dtype=dtype, layout=pick(*LAYOUTS), batch=pick(1, 1, 2, 3))
    spec["kv_heads"] = r.randint(1, 3)
    spec["heads"] = spec["kv_heads"] * pick(1, 1, 2, 4)
    long = native and chance(0.2)  # across the native kernel's key blocks (512) and query blocks
    spec["dim"] = pick(1, 2, 3, 8, 16, 24, 32, 40, 64, 72, 128) if long or chance(0.9) else pick(256, 512)
    spec["q_seq"], spec["kv_seq"] = r.randint(1, 600 if long else 24), r.randint(1, 600 if long else 24)
    if chance(0.08):  # zero-size axes: an empty query gives an empty output, no keys give zeros
        spec[pick("kv_seq") if native else pick("batch", "q_seq", "kv_seq", "dim")] = 0
    spec["mode"] = pick(0, 2, 3, 4) if native else pick(0, 0, 1, 2, 3, 3, 4)
    if spec["mode"] in (2, 3, 4):
        spec["mask"] = {"form": pick("2d", "3d", "4d"), "dtype": pick("int8", "bool", "uint8")}
    elif not native and (spec["mode"] == 1 or chance(0.5)):
        spec["mask"] = {"form": pick("2d", "3d", "4d"), "batch": pick("1", "B"), "pad": r.randint(0, 3),
                        "density": pick(0.0, 0.3, 0.9, 1.0), "dtype": pick("bool", "int8", "uint8")}
    spec["pre_tokens"], spec["next_tokens"] = pick(*TOKEN_EXTREMES), pick(*TOKEN_EXTREMES)
    for name, seq in (("actual_seq_lengths", spec["q_seq"]), ("actual_seq_lengths_kv", spec["kv_seq"])):
        if chance(0.6):
            count = pick(1, max(spec["batch"], 1), spec["batch"] + 1)
            spec[name] = {"values": [pick(0, seq, r.randint(0, seq)) for _ in range(count)],
                          "form": pick("list", "tuple", "int64", "int32")}
    if not native and chance(0.3):
        spec["pse"] = {"batch": pick("1", "B"), "pad_q": r.randint(0, 2), "pad_kv": r.randint(0, 2)}
    spec["scale"] = pick(1.0, 1.0, 0.5, -1.0, 0.0, 2.0, math.inf, math.nan)
    if dtype == "int8":
        spec["int8"] = {"packed": chance(0.5), "deq1": pick(1e-4, 1e-3, 0.01), "qs1": pick(1.0, 50.0, 127.0),
                        "deq2": pick(1e-3, 0.01)}
    if not native and chance(0.25):
        spec["out_int8"] = {"per_channel": chance(0.5), "offset": chance(0.5), "bf16": chance(0.5)}
    if dtype != "int8" and (chance(0.35) if non_finite is None else non_finite):
        targets = ("q", "k", "v") + (("pse",) if "pse" in spec else ())
        spec["non_finite"] = [(pick(*targets), r.random(), pick(*NON_FINITE)) for _ in range(r.randint(1, 3))]
    spec["memory"] = {name: pick("plain", "offset", "size1") for name in ("q", "k", "v", "mask", "pse")}
    if not native and chance(0.3):
        spec["mutation"], spec["mutation_pick"] = pick(*MUTATIONS), r.randrange(2**16)
    if not native:
        spec["route"] = pick("auto", "auto", "blockwise", "sdpa")
    else:  # the output on pages mapped for it (`native_kernel.FRESH_PAGES_OUTPUT_BYTES`) whatever its size
        spec["fresh_pages"] = chance(0.5)
    return spec


# --------------------------------------------------------------------------- building a call from a spec


def _shape(layout, batch, heads, seq, dim):
    return {"BSH": (batch, seq, heads * dim), "BSND": (batch, seq, heads, dim)}.get(layout, (batch, heads, seq, dim))


def _place(tensor: torch.Tensor, form: str) -> torch.Tensor:
    """The same values in another memory form torch still calls contiguous."""
    if form == "offset":  # a view into a larger buffer, at a storage offset
        buffer = torch.zeros(tensor.numel() + 5, dtype=tensor.dtype)
        buffer[5:].copy_(tensor.reshape(-1))
        return buffer[5:].view(tensor.shape)
    if form == "size1":  # size-1 axes get arbitrary strides (a D = 1 tensor: a last stride != 1)
        strides = [7919 if size == 1 else stride for size, stride in zip(tensor.shape, tensor.stride())]
        return tensor.as_strided(tensor.shape, strides)
    return tensor


def _lengths(entry):
    values, form = entry["values"], entry["form"]
    if form in ("int64", "int32"):
        return torch.tensor(values, dtype=getattr(torch, form))
    return tuple(values) if form == "tuple" else list(values)


def build(spec: dict):
    """(q, k, v, kwargs, expected): `expected` names the parameter the error must name, None for a valid case."""
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, layout, batch = DTYPES[spec["dtype"]], spec["layout"], spec["batch"]
    heads, kv_heads, dim, q_seq, kv_seq, mode = (spec[name] for name in ("heads", "kv_heads", "dim", "q_seq",
                                                                         "kv_seq", "mode"))

    def rand(shape, dt=dtype):
        if dt == torch.int8:
            return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
        return torch.randn(shape, generator=gen).to(dt)

    tensors = {"q": rand(_shape(layout, batch, heads, q_seq, dim)), "k": rand(_shape(layout, batch, kv_heads,
               kv_seq, dim)), "v": rand(_shape(layout, batch, kv_heads, kv_seq, dim))}
    kwargs = dict(num_heads=heads, num_key_value_heads=kv_heads if kv_heads != heads else 0, input_layout=layout,
                  scale_value=spec["scale"] / math.sqrt(max(dim, 1)), sparse_mode=mode,
                  pre_tokens=spec["pre_tokens"], next_tokens=spec["next_tokens"])
    mask_spec = spec.get("mask")
    if mask_spec is not None and mode in (2, 3, 4):
        mask = compressed_causal_mask().to(getattr(torch, mask_spec["dtype"]))
        kwargs["atten_mask"] = mask.view({"2d": (2048, 2048), "3d": (1, 2048, 2048),
                                          "4d": (1, 1, 2048, 2048)}[mask_spec["form"]])
    elif mask_spec is not None:
        mask_batch = 1 if mask_spec["batch"] == "1" else batch
        rows, cols = q_seq, kv_seq + mask_spec["pad"]
        shape = {"2d": (rows, cols), "3d": (mask_batch, rows, cols), "4d": (mask_batch, 1, rows, cols)}
        mask = torch.rand(shape[mask_spec["form"]], generator=gen) < mask_spec["density"]
        kwargs["atten_mask"] = mask.to(getattr(torch, mask_spec["dtype"]))
    for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
        if name in spec:
            kwargs[name] = _lengths(spec[name])
    if "pse" in spec:
        pse_batch = 1 if spec["pse"]["batch"] == "1" else batch
        pse_dtype = torch.float16 if dtype == torch.int8 else dtype
        tensors["pse"] = rand((pse_batch, heads, q_seq + spec["pse"]["pad_q"], kv_seq + spec["pse"]["pad_kv"]),
                              pse_dtype)
    if "int8" in spec:
        params = spec["int8"]
        pack = npu_trans_quant_param if params["packed"] else (lambda t: t)
        kwargs.update(deq_scale1=pack(torch.tensor([params["deq1"]])), quant_scale1=torch.tensor([params["qs1"]]),
                      deq_scale2=pack(torch.tensor([params["deq2"]])))
    expected = None
    if dtype == torch.int8 and (tensors["q"].numel() == 0 or tensors["k"].numel() == 0):
        expected = "query/key"  # the spec: int8 with empty tensors is an error
    if "out_int8" in spec:
        _output_quantization(spec["out_int8"], kwargs, dtype, heads, dim)
    for target, where, value in spec.get("non_finite", ()):
        flat = tensors[target].view(-1)
        if flat.numel():
            flat[int(where * flat.numel())] = NON_FINITE[value]
    for name, tensor in tensors.items():
        tensors[name] = _place(tensor, spec["memory"][name])
    if "atten_mask" in kwargs:
        kwargs["atten_mask"] = _place(kwargs["atten_mask"], spec["memory"]["mask"])
    if "pse" in tensors:
        kwargs["pse_shift"] = tensors.pop("pse")
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if "mutation" in spec and expected is None:
        q, k, v, expected = _mutate(spec, q, k, v, kwargs)
    return q, k, v, kwargs, expected


def _output_quantization(entry, kwargs, dtype, heads, dim):
    """int8 output: quant_scale2 (+ quant_offset2), within the combinations the spec allows."""
    channels = heads * dim
    aligned = (dim * dtype.itemsize) % 32 == 0
    numel = channels if entry["per_channel"] and aligned and channels > 1 else 1
    scale_dtype = torch.bfloat16 if entry["bf16"] and dtype == torch.bfloat16 else torch.float32
    kwargs["quant_scale2"] = torch.linspace(5, 60, numel).to(scale_dtype)
    # The operator intercepts int8 output where rows would stay uncomputed (negative band; with an offset, also
    # modes 0-with-mask/3/4 per lengths): keep the tokens non-negative and the offset to the modes it is free in.
    kwargs["pre_tokens"], kwargs["next_tokens"] = abs(kwargs["pre_tokens"]) // 2, abs(kwargs["next_tokens"]) // 2
    if entry["offset"] and (kwargs["sparse_mode"] in (1, 2) or kwargs["sparse_mode"] == 0
                            and "atten_mask" not in kwargs):
        kwargs["quant_offset2"] = torch.full((numel,), 3.0).to(scale_dtype)


def _mutate(spec, q, k, v, kwargs):
    """One violation of the spec, and the parameter its error must name; an inapplicable mutation is a no-op."""
    pick = spec["mutation_pick"]
    mutation = spec["mutation"]
    lengths_name = ("actual_seq_lengths", "actual_seq_lengths_kv")[pick % 2]
    if mutation == "sparse_mode":
        kwargs["sparse_mode"] = (5, 6, 7, 8, -1, 2**31)[pick % 6]
        return q, k, v, "sparse_mode"
    if mutation == "lengths_form":
        forms = [(3, ""), (2.0, ""), ({0: 1}, ""), ("3", ""), (torch.tensor([True]), ""), (torch.tensor(2), ""),
                 (torch.tensor([[1]]), ""), (torch.tensor([1 + 0j]), ""), (torch.tensor([1.0]), ""),
                 (torch.tensor([1], device="meta"), ".device"), ([1.5], "[0]"), ([None], "[0]"), ([True], "[0]")]
        value, suffix = forms[pick % len(forms)]
        kwargs[lengths_name] = value
        return q, k, v, lengths_name + suffix
    if mutation == "lengths_range" and spec["batch"] >= 1:
        seq = spec["q_seq"] if lengths_name == "actual_seq_lengths" else spec["kv_seq"]
        kwargs[lengths_name] = [seq + 1 if pick % 4 else -1]
        return q, k, v, f"{lengths_name}[0]"
    if mutation == "lengths_count" and spec["batch"] >= 3:
        kwargs[lengths_name] = [0, 0]
        return q, k, v, f"len({lengths_name})"
    if mutation == "meta_device":
        present = sorted(name for name in ("atten_mask", "pse_shift", "deq_scale1", "quant_scale1", "deq_scale2",
                                           "quant_scale2", "quant_offset2") if name in kwargs)
        if not present:
            kwargs["padding_mask"] = torch.zeros(1, device="meta")
            return q, k, v, "padding_mask.device"
        name = present[pick % len(present)]
        kwargs[name] = kwargs[name].to("meta")
        return q, k, v, f"{name}.device"
    if mutation == "padding_mask":
        kwargs["padding_mask"] = ("x", 3, [1.0])[pick % 3]
        return q, k, v, "padding_mask"
    if mutation == "noncontiguous" and q.shape[-1] >= 2 and q.numel():
        name = ("query", "key", "value")[pick % 3]
        tensors = dict(query=q, key=k, value=v)
        target = tensors[name]
        if target.numel():
            wide = torch.zeros(*target.shape[:-1], 2 * target.shape[-1], dtype=target.dtype)
            tensors[name] = wide[..., ::2].copy_(target)  # last stride 2
            return tensors["query"], tensors["key"], tensors["value"], name
    if mutation == "expanded_mask" and kwargs.get("atten_mask") is not None and kwargs["sparse_mode"] in (0, 1):
        mask = kwargs["atten_mask"]
        if mask.dim() >= 3 and spec["batch"] >= 2 and mask.shape[-1] >= 2 and mask.shape[-2] >= 1:
            kwargs["atten_mask"] = mask[:1].expand(spec["batch"], *mask.shape[1:])  # batch stride 0
            return q, k, v, "atten_mask"
    if mutation == "key_dtype" and q.dtype != torch.int8:
        other = torch.float16 if q.dtype != torch.float16 else torch.bfloat16
        return q, k.to(other), v, "key.dtype"
    if mutation == "kv_heads" and spec["layout"] != "BSH" and spec["heads"] % 2 == 0 and spec["kv_heads"] == 1:
        kwargs["num_key_value_heads"] = 2
        return q, k, v, "num_key_value_heads"
    if mutation == "pse_shape" and kwargs.get("pse_shift") is not None:
        pse = kwargs["pse_shift"]
        kwargs["pse_shift"] = torch.zeros(pse.shape[0], pse.shape[1] + 1, *pse.shape[2:], dtype=pse.dtype)
        return q, k, v, "pse_shift.shape"
    if mutation == "compressed_mask" and kwargs["sparse_mode"] in (2, 3, 4):
        kwargs["atten_mask"] = (None, torch.zeros(2048, 2047, dtype=torch.bool),
                                compressed_causal_mask().view(1, 2048, 1, 2048))[pick % 3]
        return q, k, v, "atten_mask"
    if mutation == "int8_scale" and q.dtype == torch.int8:
        name = ("deq_scale1", "quant_scale1", "deq_scale2")[pick % 3]
        kwargs[name] = None
        return q, k, v, name
    if mutation == "float_scale" and q.dtype != torch.int8:
        name = ("deq_scale1", "quant_scale1", "deq_scale2")[pick % 3]
        kwargs[name] = torch.ones(1)
        return q, k, v, name
    if mutation == "head_dim" and spec["layout"] != "BSH":
        shape = list(q.shape)
        shape[-1] = 520
        q = torch.zeros(shape, dtype=q.dtype)
        k = torch.zeros(*k.shape[:-1], 520, dtype=k.dtype)
        return q, k, k.clone(), "D"
    if mutation == "tokens":
        name = ("pre_tokens", "next_tokens")[pick % 2]
        kwargs[name] = (1.0, 2**64, -(2**63) - 1, "1", True)[pick % 5]
        return q, k, v, name
    if mutation == "num_heads":
        kwargs["num_heads"] = (0, 257, -1, 2.0)[pick % 4]
        return q, k, v, "num_heads"
    if mutation == "scale_value":
        kwargs["scale_value"] = ("1", None, True)[pick % 3]
        return q, k, v, "scale_value"
    return q, k, v, None


# --------------------------------------------------------------------------- checks


def _assert_error_names(error: BaseException, param: str):
    message = str(error)
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {message}"
    assert message.startswith("npu_prompt_flash_attention: ") and " is invalid: " in message, message
    assert f"{param} = " in message, f"the error should name {param}: {message}"


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """Equal shapes and dtypes, NaN and +-inf at the same places, finite values within `tol`."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape,
                                                                               actual.dtype, expected.dtype)
    if actual.dtype == torch.int8:
        assert torch.equal(actual, expected)
        return
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), f"NaN at {(a.isnan() != e.isnan()).nonzero()[:5].tolist()}"
    assert torch.equal(a.isposinf(), e.isposinf()) and torch.equal(a.isneginf(), e.isneginf()), "inf differs"
    torch.testing.assert_close(a, e, atol=tol, rtol=tol, equal_nan=True)


def _brute_force_kwargs(kwargs):
    names = ("num_heads", "input_layout", "scale_value", "sparse_mode", "num_key_value_heads", "atten_mask",
             "pse_shift", "pre_tokens", "next_tokens")
    out = {name: kwargs[name] for name in names if name in kwargs}
    for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
        if name in kwargs:
            lengths = kwargs[name]
            out[name] = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    return out


def _call_route(route: str, q, k, v, kwargs) -> torch.Tensor:
    """The public op with the native kernel off and, per `route`, SDPA forced or the delegations off."""
    patches = [(native_kernel, "plan", lambda *a, **kw: None)]
    if route == "sdpa":
        patches.append((sdpa_path, "MIN_SEQ", 1))
    elif route == "blockwise":
        patches.append((vllm_cpu_kernel, "plan", lambda *a, **kw: None))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        return npu_prompt_flash_attention(q, k, v, **kwargs)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def check_python_case(spec: dict) -> None:
    q, k, v, kwargs, expected = build(spec)
    if expected is not None:
        with pytest.raises(Exception) as info:
            _call_route(spec["route"], q, k, v, kwargs)
        _assert_error_names(info.value, expected)
        return
    actual = _call_route(spec["route"], q, k, v, kwargs)
    reference = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
    _assert_same(actual, reference, TOLERANCE.get(q.dtype, 0.0))
    cost = q.shape[0] * spec["heads"] * spec["q_seq"] * spec["kv_seq"]
    if q.dtype != torch.int8 and "quant_scale2" not in kwargs and 0 < cost <= BRUTE_FORCE_BUDGET:
        exact = brute_force(q, k, v, **_brute_force_kwargs(kwargs))
        _assert_same(reference.double(), exact, TOLERANCE[q.dtype])


def check_native_case(spec: dict, calls: list) -> None:
    """One case through the public op, native kernel on; each kernel run appends to `calls`."""
    q, k, v, kwargs, expected = build(spec)
    assert expected is None, spec
    fresh_from = 0 if spec.get("fresh_pages") else native_kernel.FRESH_PAGES_OUTPUT_BYTES
    with counting_native_runs(calls), mock.patch.object(native_kernel, "FRESH_PAGES_OUTPUT_BYTES", fresh_from):
        actual = npu_prompt_flash_attention(q, k, v, **kwargs)
    _assert_same(actual, reference_npu_prompt_flash_attention(q, k, v, **kwargs), TOLERANCE[q.dtype])


# --------------------------------------------------------------------------- the tests


def _examples(request, part: str) -> int:
    return request.config.getoption("--fuzz-examples") or DEFAULT_EXAMPLES[part]


def test_fuzz_python_paths(request):
    """Validation, reference, brute force, and the blockwise, SDPA and vLLM-kernel routes, in process."""

    @settings(max_examples=_examples(request, "python"), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(cases())
    def run(spec):
        check_python_case(spec)

    run()


@pytest.fixture(scope="module")
def native_reports(request, tmp_path_factory) -> dict:
    """One subprocess runs both parts (one interpreter start); a crash fails the tests that read it."""
    return run_child(__file__, _examples(request, "native"), tmp_path_factory.mktemp("fuzz") / "current_case.json")


@pytest.mark.skipif(not native_kernel.available(), reason="the native kernel needs an AVX-512 CPU and a built _C")
@pytest.mark.parametrize("part", ["finite", "non_finite"])
def test_fuzz_native_kernel(native_reports, part):
    """Native-kernel cases, in a subprocess: a crash (nonzero or negative return code) or any mismatch fails."""
    report = native_reports[part]
    assert report["native_calls"] > report["examples"] // 2, report  # the cases do reach the kernel
    assert not report["failures"], json.dumps(report["failures"][:5], indent=1)


def _child(examples: int, current: str) -> None:
    """Runs native cases in this process, both parts; prints one JSON line: per part examples, native_calls,
    failures."""
    print(json.dumps({"finite": _child_part(examples, current, False),
                      "non_finite": _child_part(examples, current, True)}))


def _child_part(examples: int, current: str, non_finite: bool) -> dict:
    report = {"examples": 0, "native_calls": 0, "failures": []}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(native=True, non_finite=non_finite))
    def run(spec):
        with open(current, "w") as file:  # read by the parent if this process dies in the case
            json.dump(spec, file)
        report["examples"] += 1
        calls = []
        try:
            check_native_case(spec, calls)
        except Exception as error:  # recorded, not raised: every case runs, and no shrinking
            report["failures"].append({"spec": spec, "native": bool(calls),
                                       "error": f"{type(error).__name__}: {error}"[:600]})
        report["native_calls"] += bool(calls)

    run()
    return report


if __name__ == "__main__":
    child_main("native-kernel fuzz cases (run by test_fuzz_native_kernel)", _child)

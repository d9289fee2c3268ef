"""The operator part of `python -m vllm_pfa.check`: a table of the spec's cases through `npu_prompt_flash_attention`
on this machine's device, each compared with the exact reference on CPU, and a sample of the spec's invalid inputs,
each of which must be refused.

On an NPU the cases' tensors go to the device, so the public op hands them to torch_npu; on CPU the op runs the
package's own implementation (fast path, native kernel). The reference always runs on CPU, on the same inputs.
The table lives in the package (the tests are not in the wheel); tests/pfa_cases.py and tests/test_op_validation.py
build the same kinds of problems for the test suite.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from vllm_pfa.check_report import FAIL, PASS, Row
from vllm_pfa.ops import (compressed_causal_mask, npu_prompt_flash_attention, npu_trans_quant_param,
                          reference_npu_prompt_flash_attention)

F16, BF16, I8 = torch.float16, torch.bfloat16, torch.int8

# Dtype tolerances (atol = rtol), as the operator tests use them against the reference. An int8 query's fp16 output
# gets one more step: on the NPU its probabilities are quantized to int8 after an exp the reference computes in fp32.
TOLERANCE = {torch.float32: 2e-5, F16: 4e-3, BF16: 3e-2}
INT8_INPUT_TOLERANCE = 1e-2
# int8 outputs: the NPU may round a value the other way (one step), rarely
INT8_OUTPUT_MAX_STEP = 1
INT8_OUTPUT_MIN_EXACT_SHARE = 0.97


def make_qkv(layout: str, batch: int, heads: int, kv_heads: int, q_seq: int, kv_seq: int, dim: int,
             dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query, key and value in `layout` (int8: uniform over the whole range)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int, s: int) -> torch.Tensor:
        shape = {"BSH": (batch, s, n * dim), "BSND": (batch, s, n, dim)}.get(layout, (batch, n, s, dim))
        if dtype == I8:
            return torch.randint(-128, 128, shape, generator=gen, dtype=I8)
        return torch.randn(shape, generator=gen).to(dtype)

    return rand(heads, q_seq), rand(kv_heads, kv_seq), rand(kv_heads, kv_seq)


@dataclass(frozen=True)
class OpCase:
    """One valid call: shapes, and `extra(case)` for the keyword arguments beyond heads, layout and scale."""

    name: str
    layout: str
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    q_seq: int
    kv_seq: int
    dim: int
    extra: Callable[["OpCase"], dict] = lambda case: {}  # noqa: E731
    seed: int = 0

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q, k, v = make_qkv(self.layout, self.batch, self.heads, self.kv_heads, self.q_seq, self.kv_seq, self.dim,
                           self.dtype, self.seed)
        kwargs = dict(num_heads=self.heads, num_key_value_heads=self.kv_heads, input_layout=self.layout,
                      scale_value=1 / math.sqrt(self.dim), **self.extra(self))
        return q, k, v, kwargs


# --- keyword arguments shared by cases -------------------------------------------------------------------------------
Extra = Callable[[OpCase], dict]


def _combine(*extras: Extra) -> Extra:
    return lambda case: {name: value for extra in extras for name, value in extra(case).items()}


def _mode(mode: int, **kwargs) -> Extra:
    """sparse_mode 2/3/4 with the compressed causal mask they take, plus `kwargs`."""
    return lambda case: dict(sparse_mode=mode, atten_mask=compressed_causal_mask(), **kwargs)


def _explicit_mask(mode: int, mask_batch: int | None, dtype: torch.dtype, pre_tokens: int = 2147483647,
                   next_tokens: int = 0) -> Extra:
    """sparse_mode 0/1 with a random user mask [Sq, Skv] (mask_batch None) or [mask_batch, Sq, Skv] that keeps the
    diagonal (no row fully masked by chance). In mode 0 the mask also masks everything outside the pre/next band:
    the NPU kernel applies the band per tile only and relies on the mask for the rest (DESIGN.md, section 2)."""
    def extra(case: OpCase) -> dict:
        shape = (case.q_seq, case.kv_seq) if mask_batch is None else (mask_batch, case.q_seq, case.kv_seq)
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(case.seed + 1)) < 0.3
        rows, cols = torch.arange(case.q_seq)[:, None], torch.arange(case.kv_seq)[None, :]
        mask &= rows != cols
        if mode == 0:
            mask |= (cols < rows - pre_tokens) | (cols > rows + next_tokens)
            return dict(sparse_mode=0, atten_mask=mask.to(dtype), pre_tokens=pre_tokens, next_tokens=next_tokens)
        return dict(sparse_mode=mode, atten_mask=mask.to(dtype))
    return extra


def _pse(case: OpCase) -> dict:
    gen = torch.Generator().manual_seed(case.seed + 2)
    return dict(pse_shift=torch.randn(case.batch, case.heads, case.q_seq, case.kv_seq, generator=gen).to(case.dtype))


def _lengths(q: list[int] | None = None, kv: list[int] | None = None) -> Extra:
    lengths = dict(actual_seq_lengths=q, actual_seq_lengths_kv=kv)
    return lambda case: {name: value for name, value in lengths.items() if value is not None}


def _int8_scales(packed: bool) -> Extra:
    """Dequant/quant scales of the int8 pipeline; `packed`: uint64, as torch_npu.npu_trans_quant_param makes them
    (else float32, which the spec accepts as well)."""
    def extra(case: OpCase) -> dict:
        deq1, deq2 = torch.tensor([0.004]), torch.tensor([0.002])
        if packed:
            deq1, deq2 = npu_trans_quant_param(deq1), npu_trans_quant_param(deq2)
        return dict(deq_scale1=deq1, quant_scale1=torch.tensor([120.0]), deq_scale2=deq2)
    return extra


def _int8_output(scale: float, offset: float | None, per_channel: bool, dtype: torch.dtype = torch.float32) -> Extra:
    """Output quantization round(O * quant_scale2 + quant_offset2), per tensor or per channel (N*D values)."""
    def values(case: OpCase, value: float) -> torch.Tensor:
        if per_channel:
            return torch.linspace(value / 4, value, case.heads * case.dim).to(dtype)
        return torch.tensor([value]).to(dtype)

    def extra(case: OpCase) -> dict:
        quant = dict(quant_scale2=values(case, scale))
        if offset is not None:
            quant["quant_offset2"] = values(case, offset)
        return quant
    return extra


# --- the table -------------------------------------------------------------------------------------------------------
QUICK_CASES = (
    OpCase("BSH fp16 MHA, sparse_mode 0, no mask", "BSH", F16, 2, 4, 4, 33, 33, 64),
    OpCase("BSND bf16 GQA 8/2, causal (mode 3)", "BSND", BF16, 2, 8, 2, 40, 40, 64, _mode(3)),
    OpCase("BNSD fp16 MQA 8/1, left-up causal (mode 2)", "BNSD", F16, 2, 8, 1, 24, 40, 64, _mode(2)),
    OpCase("BNSD_BSND bf16 GQA, causal, actual lengths shorter", "BNSD_BSND", BF16, 2, 4, 2, 32, 48, 64,
           _combine(_mode(3), _lengths([17, 32], [25, 40]))),
    OpCase("BSND fp16 GQA, chunk over cached context (Sq < Skv, mode 3)", "BSND", F16, 2, 4, 2, 16, 80, 64,
           _mode(3)),
    OpCase("BSND fp16 GQA, bool mask [B, Sq, Skv] (mode 0)", "BSND", F16, 2, 4, 2, 20, 28, 64,
           _explicit_mask(0, 2, torch.bool, next_tokens=65535)),
    OpCase("BNSD bf16, int8 mask with pre/next band (mode 0)", "BNSD", BF16, 1, 4, 4, 24, 24, 64,
           _explicit_mask(0, None, torch.int8, pre_tokens=5, next_tokens=2)),
    OpCase("BSH bf16 GQA, shared uint8 mask (mode 1)", "BSH", BF16, 2, 4, 2, 18, 30, 64,
           _explicit_mask(1, 1, torch.uint8)),
    OpCase("BNSD fp16, sliding window band (mode 4, pre 7)", "BNSD", F16, 2, 4, 2, 40, 40, 64,
           _mode(4, pre_tokens=7, next_tokens=0)),
    OpCase("BSND bf16 MQA, band (mode 4, pre 3 next 2), kv shorter", "BSND", BF16, 2, 4, 1, 24, 32, 64,
           _combine(_mode(4, pre_tokens=3, next_tokens=2), _lengths(kv=[30, 20]))),
    OpCase("BNSD fp16 GQA, pse_shift + causal (mode 3)", "BNSD", F16, 2, 4, 2, 20, 20, 64, _combine(_mode(3), _pse)),
    OpCase("BSH fp16 MHA, one batch without keys (actual kv 0)", "BSH", F16, 2, 2, 2, 12, 16, 64,
           _lengths([12], [16, 0])),
    OpCase("BNSD int8 -> fp16, GQA, causal, packed uint64 scales", "BNSD", I8, 2, 4, 2, 16, 16, 32,
           _combine(_mode(3), _int8_scales(packed=True))),
    OpCase("BNSD int8 -> fp16, float32 scales, no mask", "BNSD", I8, 1, 2, 2, 12, 20, 64, _int8_scales(packed=False)),
    OpCase("BSND int8 -> int8, per-tensor quant, causal", "BSND", I8, 2, 4, 2, 16, 16, 32,
           _combine(_mode(3), _int8_scales(packed=False), _int8_output(20.0, 1.0, per_channel=False))),
    OpCase("BNSD int8 -> int8, per-channel quant", "BNSD", I8, 1, 4, 4, 12, 12, 32,
           _combine(_int8_scales(packed=False), _int8_output(40.0, None, per_channel=True))),
    OpCase("BSND fp16 -> int8, per-channel output quant", "BSND", F16, 1, 2, 2, 16, 16, 32,
           _int8_output(60.0, 2.0, per_channel=True)),
    OpCase("BSH bf16 -> int8, per-tensor output quant (bf16 scales)", "BSH", BF16, 2, 2, 2, 10, 10, 64,
           _int8_output(30.0, 2.0, per_channel=False, dtype=BF16)),
)

# Longer problems, as the backend's calls look: past the 2048-token compressed mask, realistic heads and head_dim.
FULL_ONLY_CASES = (
    OpCase("BSND bf16 GQA 8/2 D=128, causal, 2300 tokens", "BSND", BF16, 1, 8, 2, 2300, 2300, 128, _mode(3)),
    OpCase("BSND fp16 GQA 8/2 D=128, 512-token chunk over 3000 context", "BSND", F16, 1, 8, 2, 512, 3000, 128,
           _mode(3)),
    OpCase("BNSD_BSND fp16 GQA, batch 4, varying lengths, causal", "BNSD_BSND", F16, 4, 8, 2, 1024, 1024, 64,
           _combine(_mode(3), _lengths([1024, 700, 301, 1], [1024, 900, 301, 64]))),
    OpCase("BSH bf16 MHA D=256, mode 0, no mask", "BSH", BF16, 1, 4, 4, 600, 600, 256),
    OpCase("BSND bf16 GQA, window 256 (mode 4), 2500 tokens", "BSND", BF16, 1, 4, 2, 2500, 2500, 128,
           _mode(4, pre_tokens=255, next_tokens=0)),
    OpCase("BNSD fp16 MQA 16/1, pse_shift + mask (mode 1)", "BNSD", F16, 1, 16, 1, 256, 256, 64,
           _combine(_explicit_mask(1, None, torch.bool), _pse)),
    OpCase("BNSD int8 -> fp16, GQA 8/2 D=128, causal, 512 tokens", "BNSD", I8, 1, 8, 2, 512, 512, 128,
           _combine(_mode(3), _int8_scales(packed=False))),
    OpCase("BSND fp16 -> int8 per-tensor, causal, 1024 tokens", "BSND", F16, 1, 8, 2, 1024, 1024, 128,
           _combine(_mode(3), _int8_output(40.0, 1.0, per_channel=False))),
)


def operator_cases(quick: bool) -> tuple[OpCase, ...]:
    return QUICK_CASES if quick else QUICK_CASES + FULL_ONLY_CASES


# --- invalid inputs: each one rule of the spec broken on an otherwise valid call --------------------------------------
@dataclass(frozen=True)
class InvalidCase:
    name: str
    build: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]


def _baseline(layout: str = "BSND", dtype: torch.dtype = F16, batch: int = 2, heads: int = 4, kv_heads: int = 2,
              q_seq: int = 8, kv_seq: int = 8, dim: int = 16, **kwargs) -> Callable[[], tuple]:
    """A valid BSND fp16 GQA call with shapes and keyword arguments changed."""
    def build() -> tuple:
        q, k, v = make_qkv(layout, batch, heads, kv_heads, q_seq, kv_seq, dim, dtype)
        return q, k, v, {**dict(num_heads=heads, num_key_value_heads=kv_heads, input_layout=layout), **kwargs}
    return build


def _swap(index: int, **shape) -> Callable[[], tuple]:
    """The baseline with query (0) or key and value (1) built with other shapes or dtype."""
    def build() -> tuple:
        q, k, v, kwargs = _baseline()()
        other = make_qkv("BSND", **{**dict(batch=2, heads=4, kv_heads=2, q_seq=8, kv_seq=8, dim=16,
                                           dtype=F16), **shape})
        return (q, *other[1:], kwargs) if index else (other[0], k, v, kwargs)
    return build


INVALID_CASES = (
    InvalidCase("sparse_mode 5 (out of range)", _baseline(sparse_mode=5)),
    InvalidCase("sparse_mode 1 without a mask", _baseline(sparse_mode=1)),
    InvalidCase("sparse_mode 2 without the compressed mask", _baseline(sparse_mode=2)),
    InvalidCase("sparse_mode 3 with an 8x8 mask, not the 2048x2048 one",
                _baseline(sparse_mode=3, atten_mask=torch.zeros(8, 8, dtype=torch.bool))),
    InvalidCase("input_layout 'BNDS'", _baseline(input_layout="BNDS")),
    InvalidCase("num_heads 2 for a query with N = 4", _baseline(num_heads=2)),
    InvalidCase("num_heads 6 not divisible by 4 kv heads", _baseline(heads=6, kv_heads=4)),
    InvalidCase("GQA ratio 130/2 = 65 > 64", _baseline(heads=130, kv_heads=2, q_seq=1, kv_seq=1)),
    InvalidCase("head dim 528 > 512", _baseline(heads=2, kv_heads=2, q_seq=2, kv_seq=2, dim=528)),
    InvalidCase("actual_seq_lengths 9 > S = 8", _baseline(actual_seq_lengths=[9, 1])),
    InvalidCase("key bf16 with an fp16 query", _swap(1, dtype=BF16)),
    InvalidCase("key batch 3 with a query batch 2", _swap(1, batch=3)),
    InvalidCase("pse_shift with 3 heads for 4", _baseline(pse_shift=torch.zeros(2, 3, 8, 8, dtype=F16))),
    InvalidCase("int8 query without dequant scales", _baseline(dtype=I8, dim=32)),
)


# --- running them ----------------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    name: str
    passed: bool
    error_to_tolerance: float  # worst |actual - expected| / (atol + rtol |expected|); int8 outputs: worst step / 1
    detail: str
    tags: dict = field(default_factory=dict)


def _to_device(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def compare(actual: torch.Tensor, expected: torch.Tensor, query_dtype: torch.dtype) -> tuple[bool, float, str]:
    """Whether `actual` matches the reference `expected` at the dtype's tolerance; the worst error as a share of
    the tolerance; a short description."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False, math.inf, (f"got {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} "
                                 f"{expected.dtype}")
    if expected.numel() == 0:
        return True, 0.0, "empty"
    if expected.dtype == I8:
        steps = (actual.int() - expected.int()).abs()
        exact = float((steps == 0).float().mean())
        worst = int(steps.max())
        ok = worst <= INT8_OUTPUT_MAX_STEP and exact >= INT8_OUTPUT_MIN_EXACT_SHARE
        return ok, worst / INT8_OUTPUT_MAX_STEP, f"max step {worst}, {exact:.1%} exact"
    tol = INT8_INPUT_TOLERANCE if query_dtype == I8 else TOLERANCE[query_dtype]
    a, e = actual.double(), expected.double()
    if not torch.equal(a.isfinite(), e.isfinite()):
        return False, math.inf, "non-finite values where the reference has none (or the reverse)"
    finite = e.isfinite()
    error = (a - e).abs()[finite]
    share = float((error / (tol + tol * e[finite].abs())).max()) if error.numel() else 0.0
    return share <= 1.0, share, f"max abs error {float(error.max()) if error.numel() else 0.0:.2e} (tol {tol:g})"


def run_case(case: OpCase, device: torch.device,
             corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CaseResult:
    """The op on `device` against the reference on CPU; `corrupt` (tests only) alters the op's result first."""
    q, k, v, kwargs = case.inputs()
    tags = dict(layout=case.layout, dtype=str(case.dtype).removeprefix("torch."),
                sparse_mode=kwargs.get("sparse_mode", 0),
                heads=case.heads, kv_heads=case.kv_heads, int8=case.dtype == I8 or "quant_scale2" in kwargs,
                actual_lengths=any(name in kwargs for name in ("actual_seq_lengths", "actual_seq_lengths_kv")))
    try:
        expected = reference_npu_prompt_flash_attention(q, k, v, **kwargs)
        on_device = {name: _to_device(value, device) for name, value in kwargs.items()}
        actual = npu_prompt_flash_attention(q.to(device), k.to(device), v.to(device), **on_device).cpu()
    except Exception as exc:  # noqa: BLE001 - a refused valid case is a failed case, reported by name
        return CaseResult(case.name, False, math.inf, f"raised {type(exc).__name__}: {_first_line(exc)}", tags)
    if corrupt is not None:
        actual = corrupt(actual)
    ok, share, detail = compare(actual, expected, case.dtype)
    return CaseResult(case.name, ok, share, detail, tags)


def corrupt_result(result: torch.Tensor) -> torch.Tensor:
    """A wrong operator result (the check's test hook): one element moved well past any tolerance."""
    wrong = result.clone()
    flat = wrong.view(-1)
    if wrong.dtype == I8:
        flat[0] = flat[0] - 5 if flat[0] > 0 else flat[0] + 5
    else:
        flat[0] = flat[0] + 1.0
    return wrong


@dataclass
class RefusalResult:
    name: str
    refused: bool
    detail: str


def run_invalid(case: InvalidCase, device: torch.device) -> RefusalResult:
    """Refused: on CPU our validation's ValueError/TypeError naming the operator; on an NPU any error torch_npu
    raises (its messages are its own)."""
    q, k, v, kwargs = case.build()
    on_device = {name: _to_device(value, device) for name, value in kwargs.items()}
    try:
        npu_prompt_flash_attention(q.to(device), k.to(device), v.to(device), **on_device)
    except Exception as exc:  # noqa: BLE001 - any refusal is what is checked; its kind is checked below
        message = _first_line(exc)
        if device.type == "npu":
            return RefusalResult(case.name, True, f"{type(exc).__name__}: {message}")
        ours = isinstance(exc, (ValueError, TypeError)) and message.startswith("npu_prompt_flash_attention: ")
        return RefusalResult(case.name, ours, f"{type(exc).__name__}: {message}")
    return RefusalResult(case.name, False, "accepted")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def run_operator_check(device: torch.device, quick: bool,
                       corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[list[Row], dict]:
    """The verdict rows of the operator table and the invalid-input sample, and their per-case report."""
    results = [run_case(case, device, corrupt) for case in operator_cases(quick)]
    refusals = [run_invalid(case, device) for case in INVALID_CASES]
    failed = [result for result in results if not result.passed]
    worst = max(result.error_to_tolerance for result in results)
    detail = (f"{len(results) - len(failed)}/{len(results)} within dtype tolerances of the CPU reference (worst "
              f"{worst:.2g} of tolerance); layouts {', '.join(sorted({r.tags['layout'] for r in results}))}; "
              f"sparse modes {', '.join(str(m) for m in sorted({r.tags['sparse_mode'] for r in results}))}")
    if failed:
        detail += "; FAILED: " + "; ".join(f"{r.name} ({r.detail})" for r in failed[:3])
        detail += f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    accepted = [refusal for refusal in refusals if not refusal.refused]
    refusal_detail = f"{len(refusals) - len(accepted)}/{len(refusals)} refused"
    if accepted:
        refusal_detail += "; NOT REFUSED: " + "; ".join(f"{r.name} ({r.detail})" for r in accepted[:3])
    rows = [Row(f"operator: spec cases on {device.type}", FAIL if failed else PASS, detail),
            Row("operator: invalid inputs refused", FAIL if accepted else PASS, refusal_detail)]
    cases = [dict(asdict(result), error_to_tolerance=result.error_to_tolerance
                  if math.isfinite(result.error_to_tolerance) else None) for result in results]
    return rows, dict(device=str(device), cases=cases, invalid=[asdict(refusal) for refusal in refusals])

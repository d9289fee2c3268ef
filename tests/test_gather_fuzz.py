"""Fuzz test of the native context gather (`_C.gather_paged_kv`, csrc/paged_kv_gather.cpp) against the torch path.

Cases draw the element size (fp32, fp16, bf16, one-byte), plain or transposed key and value blocks, block sizes on and
off the vector paths (odd ones, 1), head sizes on and off their multiples of 16 and 32, any number of tokens (a last
tile or pair cut short), block ids out of order, and outputs that are slices of larger tensors (token and head strides
of their own). Each case must equal the torch path bit for bit and leave the output's rows past seq_len as they were.
The cases run in a subprocess that loops over them and reports failures as JSON, so a crash fails the test instead of
killing pytest; `pytest --fuzz-examples=N` runs N.
"""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_subprocess import child_main, run_child
from vllm_pfa.ops import cpu_kv_layout
from vllm_pfa.ops.cpu_kv_layout import CpuKVLayout, split_kv_cache
from vllm_pfa.ops.native_kernel import extension

DEFAULT_EXAMPLES = 300
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
SENTINEL = 7


@st.composite
def cases(draw) -> dict:
    """A JSON-able spec of one gather."""
    r = draw(st.randoms(use_true_random=True))  # a random.Random seeded by hypothesis (see test_op_fuzz.cases)
    pick = lambda *options: r.choice(options)  # noqa: E731
    spec = dict(seed=r.randrange(2**16), dtype=pick(*DTYPES), key_transposed=pick(True, False),
                value_transposed=pick(True, False), block_size=pick(1, 2, 3, 16, 17, 32, 48, 128),
                heads=r.randint(1, 4), head=pick(1, 8, 16, 24, 32, 40, 48, 64, 80, 128))
    blocks = r.randint(1, 5)
    spec["blocks"], spec["spare_blocks"] = blocks, r.randint(0, 3)
    spec["seq_len"] = r.randint(0, blocks * spec["block_size"])
    spec["extra_rows"], spec["head_gap"], spec["token_gap"] = r.randint(0, 3), pick(0, 0, 16), pick(0, 0, 8)
    return spec


def _output(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A larger tensor filled with SENTINEL and its [seq_len + extra_rows, heads, head] slice the gather writes (token
    and head strides of the larger tensor where the spec asks for gaps)."""
    tokens, heads, head = spec["seq_len"] + spec["extra_rows"], spec["heads"], spec["head"]
    full = torch.full((tokens, heads + spec["token_gap"], head + spec["head_gap"]), SENTINEL,
                      dtype=DTYPES[spec["dtype"]])
    return full, full[:, :heads, :head]


def check_case(spec: dict) -> None:
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype = DTYPES[spec["dtype"]]
    num_blocks = spec["blocks"] + spec["spare_blocks"]
    shape = (num_blocks, spec["heads"], spec["block_size"], 2 * spec["head"])
    kv_cache = (torch.randint(0, 250, shape, generator=gen).to(dtype) if dtype == torch.uint8
                else torch.randn(shape, generator=gen).to(dtype))
    block_ids = torch.randperm(num_blocks, generator=gen)[: spec["blocks"]]
    layout = CpuKVLayout(spec["key_transposed"], spec["value_transposed"])
    seq_len = spec["seq_len"]
    (key_base, native_keys), (value_base, native_values) = _output(spec), _output(spec)
    extension().gather_paged_kv(*split_kv_cache(kv_cache), block_ids, seq_len, native_keys, native_values,
                                spec["key_transposed"], spec["value_transposed"])
    (_, torch_keys), (_, torch_values) = _output(spec), _output(spec)
    original = cpu_kv_layout.extension
    cpu_kv_layout.extension = lambda: None  # the torch path
    try:
        layout.gather(kv_cache, block_ids, seq_len, torch_keys, torch_values)
    finally:
        cpu_kv_layout.extension = original
    for name, base, native, reference in (("keys", key_base, native_keys, torch_keys),
                                          ("values", value_base, native_values, torch_values)):
        assert torch.equal(native[:seq_len], reference[:seq_len]), f"{name} differ from the torch path"
        untouched = base.clone()
        untouched[:seq_len, :spec["heads"], :spec["head"]] = SENTINEL
        assert bool((untouched == SENTINEL).all()), f"{name}: written outside its first seq_len rows"


@pytest.mark.skipif(extension() is None, reason="the native extension needs an AVX-512 CPU and a built _C")
def test_fuzz_native_gather(request, tmp_path):
    """Gather cases in a subprocess: a crash (nonzero or negative return code) or any mismatch fails."""
    examples = request.config.getoption("--fuzz-examples") or DEFAULT_EXAMPLES
    report = run_child(__file__, examples, tmp_path / "current_case.json")
    assert report["examples"] == examples, report
    assert not report["failures"], json.dumps(report["failures"][:5], indent=1)


def _child(examples: int, current: str) -> None:
    """Runs the cases in this process; prints one JSON line: examples and failures."""
    report = {"examples": 0, "failures": []}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def run(spec):
        with open(current, "w") as file:  # read by the parent if this process dies in the case
            json.dump(spec, file)
        report["examples"] += 1
        try:
            check_case(spec)
        except Exception as error:  # recorded, not raised: every case runs, and no shrinking
            report["failures"].append({"spec": spec, "error": f"{type(error).__name__}: {error}"[:600]})

    run()
    print(json.dumps(report))


if __name__ == "__main__":
    child_main("native gather fuzz cases (run by test_fuzz_native_gather)", _child)

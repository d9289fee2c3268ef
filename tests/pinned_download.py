"""Fetch a pinned release file once into the repository's `.cache/`: downloaded into a temporary directory, checked
against its sha256, unpacked, and marked done (tests/vllm_ascend_sdist.py, tests/torch_npu_wheel.py)."""

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path


def fetch_once(cache: Path, key: str, sha256: str, download: Callable[[Path], Path], unpack: Callable[[Path], None],
               unavailable: type[Exception]) -> None:
    done = cache / f"{key}.verified"
    if done.exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        archive = download(Path(tmp))
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sha256:
            raise unavailable(f"{archive.name} has sha256 {digest}, expected {sha256}")
        unpack(archive)
    done.write_text(sha256 + "\n")

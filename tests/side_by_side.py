"""A test module's independent runs started together, as many at a time as this process may use cores.

The start-up probes and the end-to-end engines are fresh vLLM processes whose time is mostly importing and starting
vLLM, single-threaded Python: side by side, two take little more than the time of one on the 2-core machines the suite
runs on.
"""

import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


class SideBySide(Mapping[str, T]):
    """{name: run()} for a table of runs (callables without arguments), all started at once, at most one per core at
    a time; reading an entry waits for its run and raises what the run raised."""

    def __init__(self, runs: Mapping[str, Callable[[], T]]):
        self._pool = ThreadPoolExecutor(max_workers=min(len(runs), len(cores())) or 1)
        self._futures = {name: self._pool.submit(run) for name, run in runs.items()}

    def __getitem__(self, name: str) -> T:
        return self._futures[name].result()

    def __iter__(self) -> Iterator[str]:
        return iter(self._futures)

    def __len__(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        """Runs not started yet are dropped; running ones are waited for."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def side_by_side(runs: Mapping[str, Callable[[], T]]) -> Iterator[SideBySide[T]]:
    results = SideBySide(runs)
    try:
        yield results
    finally:
        results.close()

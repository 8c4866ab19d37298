"""Helpers shared by the benchmark scripts (run them as `python benchmarks/bench_x.py`)."""
from __future__ import annotations

import time
from pathlib import Path

# the real HPA sample images beside the checkout (../shared/hpa/sample); benchmarks skip them when absent
SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "hpa" / "sample"


def best_of(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (seconds): the least disturbed measurement."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

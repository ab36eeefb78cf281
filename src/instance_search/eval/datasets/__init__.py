"""Standard retrieval benchmarks (UKBench, Holidays, Oxford5k/Paris6k classic and revisited)."""
from __future__ import annotations

from .benchmarks import (
    BENCHMARKS,
    Benchmark,
    find_shared_data,
    load_benchmark,
    load_classic,
    load_gnd_pickle,
    load_holidays,
    load_revisited,
    load_ukbench,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "find_shared_data",
    "load_benchmark",
    "load_classic",
    "load_gnd_pickle",
    "load_holidays",
    "load_revisited",
    "load_ukbench",
]

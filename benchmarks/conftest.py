"""Options of the pytest-benchmark suite (benchmarks/test_benchmarks.py), which `pytest tests` and
`make test` never collect:

    pytest benchmarks --benchmark-only [--bench-size smoke|small|large] [--bench-no-memory]
"""
import os
import sys

# The bench scripts import their siblings (harness, peers) by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    group = parser.getgroup("mmfast benchmarks")
    group.addoption("--bench-size", choices=("smoke", "small", "large"),
                    default=os.environ.get("MMFAST_BENCH_SIZE", "small"),
                    help="smoke: tiny (seconds); small: one size per family, the default (a couple of "
                         "minutes); large: the bench scripts' default sizes. Env: MMFAST_BENCH_SIZE")
    group.addoption("--bench-no-memory", action="store_true",
                    help="skip the extra peak memory, measured for each case in a fresh process")

"""bench/overload: see docs/BENCHMARKS.md."""

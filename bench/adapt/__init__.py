"""bench/adapt: see docs/BENCHMARKS.md."""

"""bench/overhead: see docs/BENCHMARKS.md."""

"""bench/routing: see docs/BENCHMARKS.md."""

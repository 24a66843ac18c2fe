"""bench/prune: see docs/BENCHMARKS.md."""

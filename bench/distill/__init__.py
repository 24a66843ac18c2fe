"""bench/distill: see docs/BENCHMARKS.md."""

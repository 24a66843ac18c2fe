"""bench/local_backend: see docs/BENCHMARKS.md."""

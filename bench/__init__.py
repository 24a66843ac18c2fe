"""Benchmarks that compare distillgate with its peers, run by hand from the repo root as
`python -m bench.<family>.<script>`; figures and commands in docs/BENCHMARKS.md."""

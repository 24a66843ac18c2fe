"""Rate-limit accuracy benchmark (run.py)."""

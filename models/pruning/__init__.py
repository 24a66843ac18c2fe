"""Internals of structural pruning (public entry point: `models.prune`): parameter
counting, calibration hooks, importance-ranked plans and the state-dict surgery."""

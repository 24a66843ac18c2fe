"""Adaptive student selection: `model: "auto"` goes to the cheapest model whose predicted
quality, latency and cost meet the request's SLO class (policy.py, domains.py, quality.py,
estimates.py, the pure decision in selector.py, and router.py joining them)."""

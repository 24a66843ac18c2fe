"""Tests of the deployment files under deploy/: image, compose, rules, dashboard, Kubernetes."""

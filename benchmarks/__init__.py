"""Benchmarks of repo_lightning (run from the repository root: ``python -m benchmarks.<name>``)."""

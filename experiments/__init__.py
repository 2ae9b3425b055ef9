"""Benchmarks and experiments for oto_jax (run as ``python -m experiments.<name>``)."""

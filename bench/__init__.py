"""stockflow's benchmark (see run.py and docs/performance.md)."""

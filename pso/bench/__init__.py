"""Benchmarks run by `pso bench ...`: they print figures and write tables, never assert."""

"""Benchmarks and load simulators; run by their own commands, never by the pytest suite."""

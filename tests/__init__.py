"""Sentinel test suite."""

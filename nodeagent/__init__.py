"""Sentinel node agent."""

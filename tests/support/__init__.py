"""Helpers shared by the tests: small datasets written on disk (datasets.py)."""

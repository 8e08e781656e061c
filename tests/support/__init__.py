"""Helpers shared by the tests (import as `support.<module>`; pytest puts tests/ on sys.path)."""

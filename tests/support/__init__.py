"""Helpers shared by the test modules: datasets on disk, `flwr run` and deployment harnesses."""

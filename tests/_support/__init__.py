"""Helpers shared by test modules (importable: pyproject puts tests/ on the path for pytest)."""

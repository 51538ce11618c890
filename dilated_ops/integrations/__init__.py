"""Integrations with other libraries (optional dependencies, detected at run time)."""

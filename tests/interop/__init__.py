"""Interop tests: clients in other languages against the broker, next to the Python SDK."""

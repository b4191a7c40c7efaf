"""Tests of the Python SDK (clients/python/taskbroker) against a real broker."""

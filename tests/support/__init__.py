"""Test support helpers."""

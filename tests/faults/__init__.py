"""Fault tests: network faults injected with tests.support.fault_proxy (RELIABILITY.md 7)."""

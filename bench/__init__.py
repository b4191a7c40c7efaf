"""The benchmark suite (`make bench`, `python -m bench`): one command starts its own redis-server
and broker, runs every scenario several times and reports medians against the targets.

Timings live here, not in the tests (STYLE.md): a benchmark is a measurement, not a pass/fail
check, and it needs a quiet machine and minutes of wall time.
"""

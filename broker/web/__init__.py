"""Observability over HTTP: Prometheus metrics, /healthz, and the live dashboard with its JSON API.

`timings` is imported by the hot path (broker/queue.py) and uses the standard library only;
everything that needs aiohttp or prometheus-client lives in the other modules.
"""

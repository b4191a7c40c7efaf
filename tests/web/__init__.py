"""Tests of the HTTP side: metrics, health, the dashboard and its JSON API."""

"""Measurement only: datasets, real-time replay, suites and reports."""

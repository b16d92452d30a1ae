"""Streaming speech synthesis."""

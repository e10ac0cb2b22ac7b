"""Benchmarks: scripts that print figures (quality, speed, memory); run as ``python -m benchmarks.<name>``."""

"""The package version (a module of its own, so the CLI reads it without importing the API)."""

__version__ = "0.1.0"

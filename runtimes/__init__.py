"""Execution: ONNX Runtime sessions per target, the decode loop, perplexity and benchmarks (no torch here)."""

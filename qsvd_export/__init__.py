"""qsvd-export: QSVD joint low-rank attention compression exported to ONNX with a latent KV cache."""

__version__ = "0.1.0"

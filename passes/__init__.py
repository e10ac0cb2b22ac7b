"""ONNX graph passes (onnx_ir), packaged as ``qsvd_export.passes``: one pass per module."""

"""qsvd-export: QSVD joint low-rank attention compression exported to ONNX with a latent KV cache.

The typed Python API (``qsvd_export.api``): :func:`export_model`, :func:`compress_model`, :func:`compile_graph`,
:func:`load_bundle` and their option classes.
"""

__version__ = "0.1.0"

from qsvd_export.api import (  # noqa: E402  (after __version__: the CLI imports it)
    Bundle,
    CompileOptions,
    CompressionOptions,
    ExportOptions,
    compile_graph,
    compress_model,
    export_model,
    load_bundle,
)

__all__ = ["Bundle", "CompileOptions", "CompressionOptions", "ExportOptions", "__version__", "compile_graph",
           "compress_model", "export_model", "load_bundle"]

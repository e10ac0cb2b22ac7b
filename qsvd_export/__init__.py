"""qsvd-export: QSVD joint low-rank attention compression exported to ONNX with a latent KV cache.

The typed Python API (``qsvd_export.api``): :func:`export_model`, :func:`compress_model`, :func:`compile_graph`,
:func:`load_bundle` and their option classes.
"""

from qsvd_export.api import (
    Bundle,
    CompileOptions,
    CompressionOptions,
    ExportOptions,
    compile_graph,
    compress_model,
    export_model,
    load_bundle,
)
from qsvd_export.version import __version__

__all__ = ["Bundle", "CompileOptions", "CompressionOptions", "ExportOptions", "__version__", "compile_graph",
           "compress_model", "export_model", "load_bundle"]

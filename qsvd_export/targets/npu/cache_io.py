"""Quantized cache I/O of the npu graphs: caches cross the graph boundary as uint8 or uint16 codes.

The QDQ graphs keep their caches quantized inside (16-bit activations); without this step they take and give
them as float32, so a runtime stores and copies 4 bytes per cached value. Here every cache tensor gets one
static, asymmetric (scale, zero point) pair per layer and tensor, shared by the ``past_*`` input and the
``present_*`` output of both graphs (prefill and decode), so a runtime moves codes between calls and never
converts: ``value = (code − zero_point) · scale``.

- The pair is set as the QDQ tensor override of the cache input, the cache output and the new values the
  output's Concat appends, from the min/max the float static graphs' calibration feeds hold (every ``past_*``
  value of both graphs, 0 included: unused slots are 0); new values outside it saturate.
- After quantization, the input's QuantizeLinear is removed (the graph input is the code tensor its
  DequantizeLinear reads) and the graph output is the code tensor the output's QuantizeLinear writes (its
  DequantizeLinear stays where the graph reads the values).

Contract of :func:`quantized_cache_io`: a QDQ graph from :func:`~qsvd_export.targets.npu.qdq.insert_qdq` with
``cache_ranges`` overrides; every cache input feeds exactly one QuantizeLinear and every cache output is written
by one DequantizeLinear, with this module's pair; anything else is a :class:`RuntimeFailure` naming the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import LayerCache
from qsvd_export.errors import RuntimeFailure

CODE_TYPES = {8: ("QUInt8", np.uint8, "uint8"), 16: ("QUInt16", np.uint16, "uint16")}


def cache_ranges(feeds: dict[str, list[dict[str, np.ndarray]]],
                 cache: list[LayerCache]) -> dict[str, tuple[float, float]]:
    """Per cache input name, (min, max) over every feed of every graph, widened to include 0."""
    ranges = {}
    for layer in cache:
        for tensor in layer.tensors:
            values = [feed[tensor.input] for role in feeds.values() for feed in role if tensor.input in feed]
            low = min(float(v.min()) for v in values) if values else 0.0
            high = max(float(v.max()) for v in values) if values else 0.0
            ranges[tensor.input] = (min(low, 0.0), max(high, 0.0))
    return ranges


def cache_overrides(float_path: Path, ranges: dict[str, tuple[float, float]], cache: list[LayerCache],
                    bits: int) -> dict[str, list[dict[str, Any]]]:
    """QDQ tensor overrides of the float static graph at ``float_path``: each cache input, its output and every
    other input of the Concat writing that output (the new tokens' keys or values) share one range at ``bits``.
    (Left to the recipe, the Concat's output range would be the union of its inputs' calibrated ranges, and the
    output's codes would not mean what the input's do.)"""
    import onnx
    from onnxruntime.quantization import QuantType

    proto = onnx.load(str(float_path), load_external_data=False)
    producers = {name: node for node in proto.graph.node for name in node.output}
    quant_type = getattr(QuantType, CODE_TYPES[bits][0])
    overrides = {}
    for layer in cache:
        for tensor in layer.tensors:
            low, high = ranges[tensor.input]
            writer = producers.get(tensor.output)
            if writer is None or writer.op_type != "Concat" or tensor.input not in writer.input:
                raise RuntimeFailure(f"cache output {tensor.output} is not a Concat of {tensor.input} and new values")
            for name in (*writer.input, tensor.output):
                overrides[name] = [{"quant_type": quant_type, "rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def quantized_cache_io(path: Path, cache: list[LayerCache], bits: int) -> dict[str, dict[str, float | int]]:
    """Rewrite the QDQ graph at ``path`` (in place, external data kept) so its cache I/O is ``bits``-bit codes.
    Returns per cache input name its ``{"scale", "zero_point"}``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    consumers: dict[str, list[Any]] = {}
    producers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    constants = {i.name: i for i in graph.initializer}
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(CODE_TYPES[bits][1]))
    params: dict[str, dict[str, float | int]] = {}
    drop = []
    renames: dict[str, str] = {}  # applied to every node at once

    def pair(node: Any) -> tuple[float, int]:
        scale = float(numpy_helper.to_array(constants[node.input[1]]).reshape(()))
        zero = numpy_helper.to_array(constants[node.input[2]])
        if zero.dtype != CODE_TYPES[bits][1]:
            raise RuntimeFailure(f"cache tensor {node.input[0]}: quantized as {zero.dtype}, not {bits}-bit")
        return scale, int(zero.reshape(()))

    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    for layer in cache:
        for tensor in layer.tensors:
            readers = consumers.get(tensor.input, [])
            if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
                raise RuntimeFailure(f"cache input {tensor.input} is not read by one QuantizeLinear")
            quantize = readers[0]
            writer = producers.get(tensor.output)
            if writer is None or writer.op_type != "DequantizeLinear":
                raise RuntimeFailure(f"cache output {tensor.output} is not written by a DequantizeLinear")
            scale, zero = pair(quantize)
            if pair(writer) != (scale, zero):
                raise RuntimeFailure(f"cache {tensor.input} and {tensor.output} have different quantization")
            renames[quantize.output[0]] = tensor.input  # the input is the codes the graph read
            drop.append(quantize)
            # the output is the codes the graph wrote; the graph's own readers read their values
            renames[writer.input[0]], renames[tensor.output] = tensor.output, f"{tensor.output}_dequantized"
            if not consumers.get(tensor.output):
                drop.append(writer)
            inputs[tensor.input].type.tensor_type.elem_type = element
            outputs[tensor.output].type.tensor_type.elem_type = element
            params[tensor.input] = {"scale": scale, "zero_point": zero}
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    kept = {v.name for v in graph.value_info} - {t.output for layer in cache for t in layer.tensors}
    value_info = [v for v in graph.value_info if v.name in kept]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    onnx.save(proto, str(path))
    return params


def coded_cache(cache: list[LayerCache], params: dict[str, dict[str, float | int]], bits: int) -> list[LayerCache]:
    """``cache`` as the coded graphs see it: each tensor of ``bits``-bit codes with its (scale, zero point)."""
    from dataclasses import replace

    return [replace(layer, tensors=[replace(t, dtype=CODE_TYPES[bits][2], quantization=params[t.input])
                                    for t in layer.tensors]) for layer in cache]

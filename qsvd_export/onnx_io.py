"""Reading user-supplied ONNX files safely: clear errors, no reads outside the model's folder."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qsvd_export.errors import BadInputError, UnsupportedModelError

TARGET_OPSET = 21  # the passes build opset-21 nodes; older graphs are upgraded first
RUNTIME_DOMAINS = ("com.microsoft", "ai.onnx.ml")  # contrib and ML ops onnxruntime runs


def _external_locations(path: Path) -> list[str]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise BadInputError(f"{path}: not a valid ONNX file ({exc.__class__.__name__})") from None
    if not proto.graph.node and not proto.graph.input:
        raise BadInputError(f"{path}: not a valid ONNX file (empty graph)")
    locations = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            locations.append(entry.get("location", ""))
    return sorted(set(locations))


def check_external_data(path: Path) -> None:
    """Refuse external data that is missing or lies outside the model's folder (absolute, '..', symlinks)."""
    folder = path.resolve().parent
    for location in _external_locations(path):
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise BadInputError(f"{path}: external data location '{location}' escapes the model's folder")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise BadInputError(f"{path}: external data '{location}' resolves outside the model's folder")
        if not target.is_file():
            raise BadInputError(f"{path}: external data file '{location}' is missing")


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX model for the graph stage (weights stay lazy on disk)."""
    path = Path(path)
    if not path.is_file():
        hint = "" if path.suffix == ".onnx" else f" (or unknown command '{path}')"
        raise BadInputError(f"{path}: no such ONNX file{hint}")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: empty file")
    check_external_data(path)
    try:
        model = ir.load(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise BadInputError(f"{path}: unreadable ONNX ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})") from None
    check_finite_weights(model, path)
    from qsvd_export.passes.chain import check_model

    upgrade_opset(model, path)
    check_known_ops(model, path)
    check_model(model, subject=str(path), when="")
    drop_identities(model)
    infer_missing_shapes(model)
    return model


def infer_missing_shapes(model: ir.Model) -> None:
    """Give the values ONNX shape inference left unknown (a legacy TorchScript export's ``unk__`` dims, e.g.
    a head Reshape whose target comes from Shape → Gather → Concat) their symbolic shapes, in place, using
    onnxruntime's symbolic shape inference (which follows shape arithmetic). Graphs whose Reshape outputs
    already have shapes are left alone; a failure of the inference leaves the graph as it was."""
    def unknown(value: ir.Value) -> bool:
        return value.shape is None or any(isinstance(d, ir.SymbolicDim) and (d.value is None or d.value.startswith("unk__"))
                                          for d in value.shape)

    if not any(n.op_type == "Reshape" and unknown(n.outputs[0]) for n in model.graph):
        return
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = ir.serde.serialize_model(model)  # external weights stay references: nothing large is read
    del proto.graph.value_info[:]
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False, verbose=0)
    except Exception:  # noqa: BLE001 - best effort: the passes decline blocks whose shapes stay unknown
        return
    if inferred is None:
        return
    shapes = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim if info.type.tensor_type.HasField("shape") else None
        if dims is not None:
            shapes[info.name] = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims])
    for node in model.graph:
        for value in node.outputs:
            if value.name in shapes and unknown(value):
                value.shape = shapes[value.name]


def drop_identities(model: ir.Model) -> None:
    """Remove nodes that pass one input through unchanged (``Identity``, a one-input ``Concat``), in place.

    The TorchScript exporter writes ``torch.cat([x])`` as a one-input Concat, e.g. between a cache input
    and the Concat that appends to it, which would hide the cache from the attention matcher."""
    from onnx_ir.passes import common

    for node in list(model.graph):
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx") and len(node.inputs) == 1 \
                and node.inputs[0] is not None:
            node.op_type = "Identity"
            for name in list(node.attributes):
                del node.attributes[name]
    common.IdentityEliminationPass()(model)


def default_opset(model: ir.Model) -> int | None:
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx"))


def upgrade_opset(model: ir.Model, path: Path) -> int | None:
    """Bring a default-domain opset below :data:`TARGET_OPSET` up to it, in place (onnxscript's version
    converter, ONNX's C++ converter as its fallback). Returns the original opset when it changed it.
    Newer opsets are kept: the ops the passes rewrite have the same semantics from 18 on."""
    from onnxscript.version_converter import convert_version

    opset = default_opset(model)
    if opset is None:
        raise BadInputError(f"{path}: the graph imports no ONNX (default-domain) opset")
    if opset >= TARGET_OPSET:
        return None
    converter_log = logging.getLogger("onnxscript.version_converter")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # it warns on stderr whenever it hands over to the C++ fallback
    try:
        convert_version(model, TARGET_OPSET, fallback=True)
    except Exception as exc:  # noqa: BLE001 - converter failures name the op they could not adapt
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise UnsupportedModelError(f"{path}: opset {opset} could not be upgraded to {TARGET_OPSET} ({reason})") from None
    finally:
        converter_log.setLevel(level)
    if default_opset(model) != TARGET_OPSET:
        raise UnsupportedModelError(f"{path}: opset {opset} could not be upgraded to {TARGET_OPSET} "
                                    f"(the converter stopped at {default_opset(model)})")
    return opset


def check_known_ops(model: ir.Model, path: Path) -> None:
    """Refuse ops that neither ONNX nor onnxruntime define, naming the first one (node and op)."""
    import onnx.defs

    from qsvd_export.passes.chain import ORT_OPS_IN_ONNX_DOMAIN

    opset = default_opset(model) or TARGET_OPSET
    functions = {(domain, name) for domain, name, _ in model.functions}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain in RUNTIME_DOMAINS or (node.domain, node.op_type) in functions or (
                domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN):
            continue
        if domain:
            raise UnsupportedModelError(f"{path}: node '{node.name}' uses op {domain}::{node.op_type}, "
                                        "which neither ONNX nor onnxruntime defines")
        if domain == "" and not onnx.defs.has(node.op_type, opset, ""):
            raise UnsupportedModelError(f"{path}: node '{node.name}' uses op {node.op_type}, which ONNX opset "
                                        f"{opset} does not define")


def check_finite_weights(model: ir.Model, path: Path) -> None:
    """Refuse float initializers holding NaN or ±Inf, naming the first one. Tensors are scanned one at a time in
    16M-element chunks and external ones unmapped after their scan: resident memory stays at one tensor."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        try:
            data = tensor.numpy()
        except Exception as exc:  # noqa: BLE001 - truncated or unreadable external data
            raise BadInputError(f"{path}: weight '{name}' cannot be read ({exc.__class__.__name__})") from None
        finite = all(np.isfinite(chunk).all() for chunk in np.array_split(data.reshape(-1), max(1, data.size >> 24)))
        kind = None if finite else ("NaN" if np.isnan(data).any() else "Inf")
        del data
        if isinstance(tensor, ir.ExternalTensor):
            with contextlib.suppress(BufferError):  # another view of it is alive: it stays mapped
                tensor.release()  # unmap: a > 2 GB graph must not stay resident after the scan
        if kind is not None:
            raise BadInputError(f"{path}: weight '{name}' contains {kind}")

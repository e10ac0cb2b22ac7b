"""Multiply-accumulates of one decode step of a decoder bundle, counted from the shapes ONNX Runtime sees.

    python -m benchmarks.decode_macs BUNDLE [BUNDLE ...] [--context 2048] [--json OUT]

The bundle's graph (``model.onnx``; for a static npu bundle ``decode.onnx``, whose cache window is fixed)
runs one decode step after ``--context`` cached tokens with the inputs of every MAC-bearing node exposed
as graph outputs, so every count comes from the runtime's own shapes, never from a formula over the
config:

- ``MatMul`` / ``MatMulInteger`` / ``FusedMatMul`` / ``com.microsoft.MatMulIntegerToFloat``: batch × M × K × N of
  the broadcast operands;
- ``Gemm``: M × K × N;
- ``com.microsoft.MatMulNBits``: rows of A × K × N;
- ``com.microsoft.GroupQueryAttention``: num_heads × S × T × (head_size of the query for QKᵀ + head size of
  the value cache for P·V), T = the present cache length;
- ``Conv`` is not expected in decoders and is refused.

The first bundle is the baseline of the ratios. Prints one line per bundle and the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_MATMULS = {"MatMul", "MatMulInteger", "MatMulIntegerToFloat", "FusedMatMul", "Gemm", "MatMulNBits",
            "GroupQueryAttention"}


def _probe(graph: Path, tmp: Path) -> tuple[Path, list[Any]]:
    """A copy of ``graph`` whose MAC-bearing nodes' inputs (and GQA outputs) are graph outputs."""
    import onnx_ir as ir

    model = ir.load(graph)
    nodes = [n for n in model.graph if n.op_type in _MATMULS]
    if any(n.op_type == "Conv" for n in model.graph):
        raise SystemExit(f"{graph}: Conv nodes are not counted")
    outputs = {v.name for v in model.graph.outputs}
    for node in nodes:
        values = list(node.inputs) + (list(node.outputs) if node.op_type == "GroupQueryAttention" else [])
        for value in values:
            if value is not None and not value.is_initializer() and value.name not in outputs:
                model.graph.outputs.append(value)
                outputs.add(value.name)
    ir.save(model, tmp / "probe.onnx", external_data="probe.onnx.data")
    return tmp / "probe.onnx", nodes


def _shape(value: Any, seen: dict[str, np.ndarray]) -> tuple[int, ...]:
    if value.is_initializer():
        return tuple(int(d) for d in value.const_value.shape)
    return tuple(seen[value.name].shape)


def node_macs(node: Any, seen: dict[str, np.ndarray]) -> int:
    """MACs of one node given the runtime arrays ``seen`` by value name (see the module doc)."""
    attrs = {k: v.value for k, v in node.attributes.items()}
    if node.op_type == "MatMulNBits":
        a = _shape(node.inputs[0], seen)
        return int(np.prod(a[:-1])) * int(attrs["K"]) * int(attrs["N"])
    if node.op_type == "GroupQueryAttention":
        q = _shape(node.inputs[0], seen)
        present_key, present_value = _shape(node.outputs[1], seen), _shape(node.outputs[2], seen)
        heads = int(attrs["num_heads"])
        return q[0] * heads * q[1] * present_key[2] * (present_key[3] + present_value[3])
    a, b = _shape(node.inputs[0], seen), _shape(node.inputs[1], seen)
    if node.op_type == "Gemm":
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else a
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    a2, b2 = (a if len(a) > 1 else (1, a[0])), (b if len(b) > 1 else (b[0], 1))
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return int(np.prod(batch, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]


def _cache_feed(config: Any, context: int) -> dict[str, np.ndarray]:
    feed = {}
    for layer in config.cache:
        for tensor in layer.tensors:
            shape = [1 if d == "batch_size" else context if d == "past_sequence_length" else d for d in tensor.shape]
            feed[tensor.input] = np.zeros(shape, dtype=tensor.dtype)
    return feed


def decode_macs(bundle: Path, context: int = 2048) -> dict[str, Any]:
    """Total and per-op-type MACs of one decode step after ``context`` cached tokens (batch 1)."""
    import onnxruntime as ort

    from qsvd_export.bundle import load_bundle_config

    config = load_bundle_config(bundle)
    roles = {g.role: g for g in config.graphs}
    static = "decode" in roles
    graph = bundle / (roles["decode"] if static else roles["model"]).filename
    with tempfile.TemporaryDirectory() as tmp:
        probe, nodes = _probe(graph, Path(tmp))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(probe), sess_options=so, providers=["CPUExecutionProvider"])
        feed: dict[str, np.ndarray] = {}
        if static:
            for value in session.get_inputs():
                shape = [d if isinstance(d, int) else 1 for d in value.shape]
                dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                         "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(int8)": np.int8,
                         "tensor(float16)": np.float16}[value.type]
                feed[value.name] = np.ones(shape, dtype=dtype) if value.name == "attention_mask" else np.zeros(shape, dtype=dtype)
            context = next((int(t.shape[t.sequence_axis]) for layer in config.cache for t in layer.tensors
                            if isinstance(t.shape[t.sequence_axis], int)), context)
        else:
            names = {i.name for i in session.get_inputs()}
            feed = _cache_feed(config, context)
            feed["input_ids"] = np.zeros((1, 1), dtype=np.int64)
            feed["attention_mask"] = np.ones((1, context + 1), dtype=np.int64)
            if "position_ids" in names:
                feed["position_ids"] = np.asarray([[context]], dtype=np.int64)
        names = [o.name for o in session.get_outputs()]
        seen = dict(zip(names, session.run(names, feed)))
    by_op: dict[str, int] = {}
    for node in nodes:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + node_macs(node, seen)
    return {"bundle": str(bundle), "graph": graph.name, "context": context, "macs": sum(by_op.values()),
            "macs_by_op": dict(sorted(by_op.items())), "kv_bytes_per_token": config.kv_bytes_per_token()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    rows = [decode_macs(b, args.context) for b in args.bundles]
    base = rows[0]["macs"]
    for row in rows:
        row["ratio_to_first"] = round(row["macs"] / base, 4)
        print(f"{row['bundle']}: {row['macs'] / 1e6:.1f} M MACs at {row['context']} cached tokens "
              f"({row['ratio_to_first']:.3f}x), KV {row['kv_bytes_per_token']} B/token", file=sys.stderr)
    text = json.dumps({"context": args.context, "bundles": rows}, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

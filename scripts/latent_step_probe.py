"""Where the 8-bit latent's decode step goes, measured on whole-model variants of one bundle (issue 22).

    python scripts/latent_step_probe.py DENSE LATENT --work DIR --json OUT [--context 2048] [--rounds 3] [--runs 5]

Writes variants of LATENT's ``model.onnx`` under ``DIR`` (weights hard-linked, not copied):

- ``block_diagonal``: an exact rewrite: the rebuilt keys stay [B, T, KVH·D], RoPE runs on them as one 3D
  ``RotaryEmbedding`` (num_heads KVH) and the scores are one MatMul of a block-diagonal query [B, H·S, KVH·D]
  with their transpose: no Reshape/Transpose of the rebuilt keys, 3× the score multiply-adds (zeros);
- ``per_head_rebuild``: an exact rewrite: the key rebuild as one batched ``MatMulIntegerToFloat`` over a
  [KVH, r, D] weight that writes the keys head-major itself (no Reshape/Transpose of the rebuilt keys);
- ``partial_rebuild_cost`` (timing ablation, not the model): the arithmetic of stop 34's partial rebuild, half of each
  KV head's key dims rebuilt and rotated, the other half scored in latent space by an integer product on the codes;
- ``no_rebuild`` (ablation, not the model): the key rebuild reads 8 latent channels instead of r;
- ``no_value_product`` (ablation, not the model): the attention-weighted latent reads one cached token;
- ``value_product_uint8`` (not exact): the attention-weighted latent straight on the uint8 codes,
  ``MatMulIntegerToFloat(QuantizeLinear(P / rowmax(P), 1/255, 0), codes, 1/255, 1, 0, z) · rowmax(P)`` with P
  reshaped to [B, H·S, T]: no float copy of the cache, probabilities on a per-row 8-bit grid;
- ``value_product_uint8_residual`` (not exact): the same plus a second integer product of the probabilities'
  rounding residual on a 255× finer grid (twice the product's arithmetic, still no float copy of the cache);
- ``value_product_uint8_stacked`` (not exact): both grids in one product, one pass over the codes: the coarse codes
  ``QuantizeLinear(P / rowmax − 1/510, 1/255, 0)`` (rounded down) and the residual's ``QuantizeLinear(·, 1/65025, 0)``
  stacked as rows of one uint8 left operand. Since stop 37 this is what the cpu target builds
  (:mod:`passes.integer_value_product`); the variant applies that pass, so a bundle built before it can be compared.

Each of DENSE, LATENT and the variants then runs in its own process, rounds interleaved: ``--runs`` times a
``--context``-token prefill and 12 timed decode steps (after 2 untimed), ``--threads`` (2). The JSON keeps every step's
ms; the print gives min / p10 / median. The exact variants' logits are compared with LATENT's first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

STEP_WORKER = r"""
import json, sys, time, numpy as np
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.sessions import SessionOptions
bundle, context, runs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
runner = DecoderRunner(bundle, "cpu", SessionOptions(threads=threads))
vocab = int(runner.config.model_config.get("vocab_size", 256))
prompt = np.random.default_rng(0).integers(0, vocab, (1, context))
steps = []
for _ in range(runs):
    logits, cache = runner.prefill(prompt)
    length = context
    for i in range(14):
        token = np.asarray([[int(np.argmax(logits[0, -1]))]])
        start = time.perf_counter()
        logits, cache = runner.step(token, np.ones((1, length + 1)), np.asarray([[length]]), cache)
        if i >= 2:
            steps.append(1000 * (time.perf_counter() - start))
        length += 1
print(json.dumps(steps))
"""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _external(bundle: Path, tensor: onnx.TensorProto) -> np.ndarray:
    """An external initializer read by offset: onnx refuses a data file with several hard links, which every
    variant's hard-linked weights give the bundle's."""
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(info["length"]) // np.dtype(dtype).itemsize
    return np.fromfile(bundle / info["location"], dtype=dtype, count=count,
                       offset=int(info.get("offset", 0))).reshape(tuple(tensor.dims))


def _array(bundle: Path, tensor: onnx.TensorProto) -> np.ndarray:
    return _external(bundle, tensor) if tensor.external_data else numpy_helper.to_array(tensor)


def _replace(graph: onnx.GraphProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    index = list(graph.node).index(old)
    graph.node.remove(old)
    for k, node in enumerate(new):
        graph.node.insert(index + k, node)


def _prune_and_sort(graph: onnx.GraphProto) -> None:
    """Topological order, then only the nodes the graph outputs need."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], list(graph.node)
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError("graph has a cycle or a missing input")
        pending = rest
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(ordered):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(alive))


def _key_rebuild(produced: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto],
                 transposed: str) -> tuple[onnx.NodeProto, onnx.NodeProto, int, int] | None:
    """(rebuild, reshape, KVH, D) when ``transposed`` is ``Transpose(Reshape(MatMulIntegerToFloat(codes, W),
    [.., KVH, D]))``, the latent's head-major rebuilt keys, else None."""
    transpose = produced.get(transposed)
    reshape = produced.get(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
    rebuild = produced.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if rebuild is None or rebuild.op_type != "MatMulIntegerToFloat" or len(rebuild.input) != 5:
        return None
    kv_heads, dim = (int(d) for d in numpy_helper.to_array(initializers[reshape.input[1]])[2:])
    return rebuild, reshape, kv_heads, dim


def block_diagonal(model: onnx.ModelProto, bundle: Path) -> int:
    """Grouped score MatMuls over RoPE(Transpose(Reshape(keys))) → block-diagonal query × flat rotated keys."""
    graph, produced, count = model.graph, _producers(model.graph), 0
    initializers = {i.name: i for i in graph.initializer}
    for matmul in [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("grouped/matmul")]:
        query_grouped, key_t = produced[matmul.input[0]], produced[matmul.input[1]]
        rope = produced.get(key_t.input[0])
        if rope is None or rope.op_type != "RotaryEmbedding":
            continue
        reshape = produced[produced[rope.input[0]].input[0]]
        kv_heads, dim = (int(d) for d in numpy_helper.to_array(initializers[reshape.input[1]])[2:])
        (scores,) = _consumers(graph, matmul.output[0])
        heads = int(numpy_helper.to_array(initializers[scores.input[1]])[1])
        p = f"{matmul.name}/block_diagonal"
        mask = np.kron(np.eye(kv_heads), np.ones((heads // kv_heads, dim))).astype(np.float32)
        _replace(graph, scores, [
            helper.make_node("RotaryEmbedding", [reshape.input[0], *rope.input[1:]], [f"{p}/keys"], name=f"{p}/rope",
                             domain="com.microsoft", interleaved=0, num_heads=kv_heads),
            helper.make_node("Tile", [query_grouped.input[0], _const(graph, f"{p}/repeats",
                                                                      np.array([1, 1, 1, kv_heads], np.int64))],
                             [f"{p}/tiled"], name=f"{p}/tile"),
            helper.make_node("Mul", [f"{p}/tiled", _const(graph, f"{p}/mask", mask.reshape(heads, 1, -1))],
                             [f"{p}/query"], name=f"{p}/mask"),
            helper.make_node("Reshape", [f"{p}/query", _const(graph, f"{p}/rows", np.array([0, -1, kv_heads * dim],
                                                                                          np.int64))],
                             [f"{p}/query3"], name=f"{p}/query3"),
            helper.make_node("Transpose", [f"{p}/keys"], [f"{p}/keys_t"], name=f"{p}/keys_t", perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}/query3", f"{p}/keys_t"], [f"{p}/scores3"], name=f"{p}/matmul"),
            helper.make_node("Shape", [f"{p}/scores3"], [f"{p}/length"], name=f"{p}/length", start=2),
            helper.make_node("Concat", [_const(graph, f"{p}/lead", np.array([0, heads, -1], np.int64)), f"{p}/length"],
                             [f"{p}/shape"], name=f"{p}/shape", axis=0),
            helper.make_node("Reshape", [f"{p}/scores3", f"{p}/shape"], [scores.output[0]], name=f"{p}/scores")])
        count += 1
    return count


def per_head_rebuild(model: onnx.ModelProto, bundle: Path) -> int:
    """Key rebuild ``Transpose(Reshape(MatMulIntegerToFloat(codes, W [r, KVH·D])))`` → one batched
    ``MatMulIntegerToFloat(Unsqueeze(codes, 1), W [KVH, r, D], column scales [KVH, 1, D])`` that writes the keys
    head-major [B, KVH, T, D] itself: the same products, no Reshape/Transpose of the rebuilt keys (exact)."""
    graph, produced, count = model.graph, _producers(model.graph), 0
    initializers = {i.name: i for i in graph.initializer}
    for transpose in [n for n in graph.node if n.op_type == "Transpose" and "latent_kv/k" in n.name]:
        found = _key_rebuild(produced, initializers, transpose.output[0])
        if found is None:
            continue
        rebuild, _, kv_heads, dim = found
        weight, scales = (_array(bundle, initializers[rebuild.input[k]]) for k in (1, 3))
        p = f"{rebuild.name}/per_head"
        heads_weight = np.ascontiguousarray(weight.reshape(weight.shape[0], kv_heads, dim).transpose(1, 0, 2))
        _replace(graph, transpose, [
            helper.make_node("Unsqueeze", [rebuild.input[0], _const(graph, f"{p}/axis", np.array([1], np.int64))],
                             [f"{p}/codes"], name=f"{p}/codes"),
            helper.make_node("MatMulIntegerToFloat",
                             [f"{p}/codes", _const(graph, f"{p}/weight", heads_weight), rebuild.input[2],
                              _const(graph, f"{p}/scales", scales.reshape(kv_heads, 1, dim).astype(np.float32)),
                              rebuild.input[4]], [transpose.output[0]], name=f"{p}/integer", domain="com.microsoft")])
        count += 1
    return count


def partial_rebuild_cost(model: onnx.ModelProto, bundle: Path) -> int:
    """Timing ablation, not the model: the cost of stop 34's partial rebuild (half the key dims rebuilt and rotated,
    the other half absorbed). Per layer the rebuild reads the first D/2 columns of each KV head's weight, RoPE runs
    on D/2 (the cos/sin caches' first D/4 columns) and the grouped scores read the query's first D/2; the query's
    other half is mapped into latent space (× a [KVH, D/2, r] weight), quantized per step
    (``DynamicQuantizeLinear``) and scored against the codes in one ``MatMulIntegerToFloat(codes, q̃ᵀ)``,
    [B, T, H·S] transposed and added to the scores. The weights are the bundle's own columns (the absorbed map
    reuses the rebuild's other half), so the arithmetic and data movement are those of the real form."""
    graph, produced, count = model.graph, _producers(model.graph), 0
    initializers = {i.name: i for i in graph.initializer}
    for matmul in [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("grouped/matmul")]:
        query, key_t = matmul.input[0], produced[matmul.input[1]]
        rope = produced.get(key_t.input[0])
        found = _key_rebuild(produced, initializers, rope.input[0]) \
            if rope is not None and rope.op_type == "RotaryEmbedding" else None
        if found is None:
            continue
        rebuild, reshape, kv_heads, dim = found
        (scores,) = _consumers(graph, matmul.output[0])
        weight, scales = (_array(bundle, initializers[rebuild.input[k]]) for k in (1, 3))
        rank, half = weight.shape[0], dim // 2
        per_head = weight.reshape(rank, kv_heads, dim)
        kept = np.ascontiguousarray(per_head[:, :, :half].reshape(rank, -1))
        absorbed = (per_head[:, :, half:].astype(np.float32) * scales.reshape(kv_heads, dim)[None, :, half:])
        p = f"{matmul.name}/partial"
        shape = numpy_helper.to_array(initializers[reshape.input[1]]).copy()
        shape[-1] = half
        cos, sin = (helper.make_node("Slice", [rope.input[k], _const(graph, f"{p}/zero{k}", np.array([0], np.int64)),
                                               _const(graph, f"{p}/quarter{k}", np.array([dim // 4], np.int64)),
                                               _const(graph, f"{p}/axis{k}", np.array([1], np.int64))],
                                    [f"{p}/cache{k}"], name=f"{p}/cache{k}") for k in (2, 3))
        _replace(graph, scores, [
            helper.make_node("MatMulIntegerToFloat", [rebuild.input[0], _const(graph, f"{p}/weight", kept),
                                                      rebuild.input[2],
                                                      _const(graph, f"{p}/scales",
                                                             scales.reshape(kv_heads, dim)[:, :half].ravel().copy()),
                                                      rebuild.input[4]], [f"{p}/keys"], name=f"{p}/rebuild",
                             domain="com.microsoft"),
            helper.make_node("Reshape", [f"{p}/keys", _const(graph, f"{p}/shape", shape)], [f"{p}/keys4"],
                             name=f"{p}/keys4"),
            helper.make_node("Transpose", [f"{p}/keys4"], [f"{p}/keys_t"], name=f"{p}/keys_t", perm=[0, 2, 1, 3]),
            cos, sin,
            helper.make_node("RotaryEmbedding", [f"{p}/keys_t", rope.input[1], f"{p}/cache2", f"{p}/cache3"],
                             [f"{p}/rotated"], name=f"{p}/rope", domain="com.microsoft", interleaved=0),
            helper.make_node("Transpose", [f"{p}/rotated"], [f"{p}/rotated_t"], name=f"{p}/rotated_t",
                             perm=[0, 1, 3, 2]),
            helper.make_node("Split", [query, _const(graph, f"{p}/halves", np.array([half, half], np.int64))],
                             [f"{p}/q_rope", f"{p}/q_nope"], name=f"{p}/query_split", axis=-1),
            helper.make_node("MatMul", [f"{p}/q_rope", f"{p}/rotated_t"], [f"{p}/scores_rope"], name=f"{p}/matmul"),
            helper.make_node("MatMul", [f"{p}/q_nope", _const(graph, f"{p}/absorb",
                                                                np.ascontiguousarray(absorbed.transpose(1, 2, 0)))],
                             [f"{p}/q_latent"], name=f"{p}/absorb"),
            helper.make_node("Reshape", [f"{p}/q_latent",
                                         _const(graph, f"{p}/rows", np.array([0, -1, rank], np.int64))],
                             [f"{p}/q_rows"], name=f"{p}/q_rows"),
            helper.make_node("Transpose", [f"{p}/q_rows"], [f"{p}/q_cols"], name=f"{p}/q_cols", perm=[0, 2, 1]),
            helper.make_node("DynamicQuantizeLinear", [f"{p}/q_cols"], [f"{p}/q8", f"{p}/q_scale", f"{p}/q_zero"],
                             name=f"{p}/q8"),
            helper.make_node("MatMulIntegerToFloat", [rebuild.input[0], f"{p}/q8", rebuild.input[2], f"{p}/q_scale",
                                                      rebuild.input[4], f"{p}/q_zero"], [f"{p}/nope_t"],
                             name=f"{p}/nope", domain="com.microsoft"),
            helper.make_node("Transpose", [f"{p}/nope_t"], [f"{p}/nope"], name=f"{p}/nope_rows", perm=[0, 2, 1]),
            helper.make_node("Shape", [f"{p}/scores_rope"], [f"{p}/score_shape"], name=f"{p}/score_shape"),
            helper.make_node("Reshape", [f"{p}/nope", f"{p}/score_shape"], [f"{p}/nope4"], name=f"{p}/nope4"),
            helper.make_node("Add", [f"{p}/scores_rope", f"{p}/nope4"], [f"{p}/sum"], name=f"{p}/sum"),
            helper.make_node("Reshape", [f"{p}/sum", scores.input[1]], [scores.output[0]], name=f"{p}/scores")])
        count += 1
    return count


def no_rebuild(model: onnx.ModelProto, bundle: Path) -> int:
    """Ablation: every MatMulIntegerToFloat key rebuild reads 8 latent channels (8 rows of its weight)."""
    graph, count = model.graph, 0
    initializers = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]:
        weight = _external(bundle, initializers[node.input[1]])
        p = f"{node.name}/ablation"
        graph.node.append(helper.make_node(
            "Slice", [node.input[0], _const(graph, f"{p}/start", np.array([0], np.int64)),
                      _const(graph, f"{p}/end", np.array([8], np.int64)),
                      _const(graph, f"{p}/axis", np.array([2], np.int64))],
            [f"{p}/codes"], name=f"{p}/slice"))
        node.input[0], node.input[1] = f"{p}/codes", _const(graph, f"{p}/weight", weight[:8].copy())
        count += 1
    return count


def no_value_product(model: onnx.ModelProto, bundle: Path) -> int:
    """Ablation: every attention-weighted latent product reads the first cached token only."""
    graph, count = model.graph, 0
    for node in [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("fold_value/weighted_latent")]:
        p = f"{node.name}/ablation"
        one = [_const(graph, f"{p}/start", np.array([0], np.int64)), _const(graph, f"{p}/end", np.array([1], np.int64))]
        for k, axis in ((0, 3), (1, 2)):
            graph.node.append(helper.make_node("Slice", [node.input[k], *one, _const(graph, f"{p}/axis{k}",
                                                                                     np.array([axis], np.int64))],
                                               [f"{p}/in{k}"], name=f"{p}/slice{k}"))
            node.input[k] = f"{p}/in{k}"
        count += 1
    return count


def value_product_uint8(model: onnx.ModelProto, bundle: Path, residual: bool = False) -> int:
    """The attention-weighted latent as an 8-bit × 8-bit product on the cached codes (see the module docstring);
    ``residual``: plus a second product of the probabilities' rounding residual on a 255× finer grid."""
    graph, produced, count = model.graph, _producers(model.graph), 0
    initializers = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("fold_value/weighted_latent")]:
        probabilities, latent4 = node.input
        dequantize = produced[produced[latent4].input[0]]
        codes, zero = dequantize.input[0], dequantize.input[2]
        if zero not in initializers:
            continue
        p = f"{node.name}/uint8"
        grid, one = _const(graph, f"{p}/grid", np.float32(1 / 255)), _const(graph, f"{p}/one", np.float32(1))
        zero_p = _const(graph, f"{p}/zero_p", np.uint8(0))
        _replace(graph, node, [
            helper.make_node("Shape", [probabilities], [f"{p}/length"], name=f"{p}/length", start=3),
            helper.make_node("Concat", [_const(graph, f"{p}/lead", np.array([0, -1], np.int64)), f"{p}/length"],
                             [f"{p}/rows"], name=f"{p}/rows", axis=0),
            helper.make_node("Reshape", [probabilities, f"{p}/rows"], [f"{p}/p3"], name=f"{p}/p3"),
            helper.make_node("ReduceMax", [f"{p}/p3", _const(graph, f"{p}/last", np.array([-1], np.int64))],
                             [f"{p}/rowmax"], name=f"{p}/rowmax", keepdims=1),
            helper.make_node("Div", [f"{p}/p3", f"{p}/rowmax"], [f"{p}/normalized"], name=f"{p}/normalized"),
            helper.make_node("QuantizeLinear", [f"{p}/normalized", grid, zero_p], [f"{p}/p8"], name=f"{p}/p8"),
            helper.make_node("MatMulIntegerToFloat", [f"{p}/p8", codes, grid, one, zero_p, zero], [f"{p}/coarse"],
                             name=f"{p}/product", domain="com.microsoft"),
            *(_residual_product(graph, p, codes, zero, grid, zero_p) if residual else
              [helper.make_node("Identity", [f"{p}/coarse"], [f"{p}/product"], name=f"{p}/total")]),
            helper.make_node("Mul", [f"{p}/product", f"{p}/rowmax"], [f"{p}/scaled"], name=f"{p}/scaled"),
            helper.make_node("Shape", [probabilities], [f"{p}/lead_dims"], name=f"{p}/lead_dims", end=3),
            helper.make_node("Shape", [codes], [f"{p}/rank"], name=f"{p}/rank", start=2),
            helper.make_node("Concat", [f"{p}/lead_dims", f"{p}/rank"], [f"{p}/shape"], name=f"{p}/shape", axis=0),
            helper.make_node("Reshape", [f"{p}/scaled", f"{p}/shape"], [node.output[0]], name=f"{p}/out")])
        count += 1
    return count


def _residual_product(graph: onnx.GraphProto, p: str, codes: str, zero: str, grid: str,
                      zero_p: str) -> list[onnx.NodeProto]:
    """r = P/rowmax − DequantizeLinear(p8) ∈ [−1/510, 1/510] on a uint8 grid of step 1/(510·127) around 128, times
    the codes; added to the coarse product."""
    fine = _const(graph, f"{p}/fine", np.float32(1 / (510 * 127)))
    middle = _const(graph, f"{p}/middle", np.uint8(128))
    return [
        helper.make_node("DequantizeLinear", [f"{p}/p8", grid, zero_p], [f"{p}/rounded"], name=f"{p}/rounded"),
        helper.make_node("Sub", [f"{p}/normalized", f"{p}/rounded"], [f"{p}/residual"], name=f"{p}/residual"),
        helper.make_node("QuantizeLinear", [f"{p}/residual", fine, middle], [f"{p}/r8"], name=f"{p}/r8"),
        helper.make_node("MatMulIntegerToFloat", [f"{p}/r8", codes, fine, _const(graph, f"{p}/unit", np.float32(1)),
                                                  middle, zero], [f"{p}/fine_product"],
                         name=f"{p}/fine_product", domain="com.microsoft"),
        helper.make_node("Add", [f"{p}/coarse", f"{p}/fine_product"], [f"{p}/product"], name=f"{p}/total")]


def value_product_uint8_stacked(model: onnx.ModelProto, bundle: Path) -> int:
    """Both grids in one ``MatMulIntegerToFloat``: the shipped pass, :mod:`passes.integer_value_product`."""
    import onnx_ir as ir

    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.integer_value_product import IntegerValueProductPass, weighted_latents

    graph = ir.from_proto(model)
    count = len(weighted_latents(graph.graph))
    run_passes(graph, [IntegerValueProductPass()])
    model.CopyFrom(ir.to_proto(graph))
    return count


VARIANTS = {"block_diagonal": block_diagonal, "per_head_rebuild": per_head_rebuild,
            "partial_rebuild_cost": partial_rebuild_cost, "no_rebuild": no_rebuild,
            "no_value_product": no_value_product,
            "value_product_uint8": value_product_uint8,
            "value_product_uint8_residual": lambda model, bundle: value_product_uint8(model, bundle, residual=True),
            "value_product_uint8_stacked": value_product_uint8_stacked}


EXACT = ("block_diagonal", "per_head_rebuild")


def write_variant(bundle: Path, work: Path, name: str) -> tuple[Path, int]:
    target = work / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in bundle.iterdir():
        if item.name != "model.onnx" and item.is_file():
            os.link(item, target / item.name)
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    count = VARIANTS[name](model, bundle)
    _prune_and_sort(model.graph)
    onnx.save(model, target / "model.onnx")
    return target, count


def largest_logit_difference(a: Path, b: Path, length: int = 600) -> float:
    from qsvd_export.runtimes.decode import DecoderRunner

    reference = DecoderRunner(a, "cpu")
    vocab = int(reference.config.model_config.get("vocab_size", 256))
    prompt = np.random.default_rng(1).integers(0, vocab, (1, length))
    first, _ = reference.prefill(prompt)
    second, _ = DecoderRunner(b, "cpu").prefill(prompt)
    return float(np.abs(first - second).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", type=Path)
    parser.add_argument("latent", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    args = parser.parse_args()
    rows = {"dense": args.dense, "latent": args.latent}
    rewrites = {}
    for name in args.variants:
        rows[name], rewrites[name] = write_variant(args.latent, args.work, name)
    exact = {name: largest_logit_difference(args.latent, rows[name]) for name in EXACT if name in rows}
    steps: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, bundle in rows.items():
            worker = subprocess.run([sys.executable, "-c", STEP_WORKER, str(bundle), str(args.context),
                                     str(args.runs), str(args.threads)], capture_output=True, text=True)
            if worker.returncode != 0:
                last = (worker.stderr.strip().splitlines() or ["no output"])[-1]
                raise SystemExit(f"latent_step_probe: {name} ({bundle}): the worker failed: {last}")
            steps[name] += json.loads(worker.stdout.strip().splitlines()[-1])
    summary = {}
    for name, times in steps.items():
        ordered = sorted(times)
        summary[name] = {"min_ms": ordered[0], "p10_ms": ordered[len(ordered) // 10],
                         "median_ms": statistics.median(ordered), "steps_ms": times}
        print(f"{name:18s} min {ordered[0]:6.2f}  p10 {ordered[len(ordered) // 10]:6.2f}  "
              f"median {statistics.median(ordered):6.2f} ms per step", flush=True)
    result = {"command": " ".join(sys.argv), "context": args.context, "threads": args.threads,
              "rewrites": rewrites,
              "exact_variants_max_abs_logit_difference": exact, "rows": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for name, difference in exact.items():
        print(f"{name} max |Δlogit| vs the bundle: {difference:.3g}")


if __name__ == "__main__":
    main()

"""Shared pieces of the passes that rework a latent layer's attention (fold_value, absorb_key)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer
from qsvd_export.passes.context import GraphStageContext, LayerRewrite
from qsvd_export.passes.contracts import Decline, GraphPass


def head_chain(chain: list[ir.Node], name: str) -> tuple[int, int]:
    """(kv_heads, head_dim) if ``chain`` is exactly Reshape [.., Hkv, D] → Transpose (0, 2, 1, 3)."""
    if [n.op_type for n in chain] != ["Reshape", "Transpose"]:
        raise Decline(f"{name} chain is {[n.op_type for n in chain]}, not Reshape → Transpose")
    reshape, transpose = chain
    shape = reshape.outputs[0].shape
    if shape is None or shape.rank() != 4 or not all(isinstance(d, int) for d in list(shape)[2:]):
        raise Decline(f"{name} head reshape without static [heads, head_dim]")
    if list(transpose.attributes["perm"].value) != [0, 2, 1, 3]:
        raise Decline(f"{name} transpose is not (0, 2, 1, 3)")
    return int(shape[2]), int(shape[3])


def repeat_heads(nodes: list[ir.Node], kv_heads: int) -> int:
    """Query heads after the HF repeat_kv pattern Unsqueeze(axis 2) → Expand → Reshape [B, H, T, D]."""
    if [n.op_type for n in nodes[:3]] != ["Unsqueeze", "Expand", "Reshape"]:
        raise Decline(f"unrecognised layout between the cache and attention: {[n.op_type for n in nodes]}")
    axes = const_array(nodes[0].inputs[1]) if len(nodes[0].inputs) > 1 else None
    out_shape = nodes[2].outputs[0].shape
    if axes is None or [int(a) for a in np.atleast_1d(axes)] != [2]:
        raise Decline("repeat_kv unsqueezes another axis")
    if out_shape is None or out_shape.rank() != 4 or not isinstance(out_shape[1], int):
        raise Decline("repeat_kv output heads unknown")
    heads = int(out_shape[1])
    if heads % kv_heads:
        raise Decline("query heads are not a multiple of kv heads")
    return heads


def per_kv_head(matrix: np.ndarray, kv_heads: int, head_dim: int) -> np.ndarray:
    """[rows, Hkv·D] → [Hkv, rows, D]."""
    return np.stack([matrix[:, g * head_dim:(g + 1) * head_dim] for g in range(kv_heads)])


def grouped_head_matmul(graph: ir.Graph, x: ir.Value, weight: ir.Value, heads: int, kv_heads: int,
                        width: int, prefix: str) -> ir.Value:
    """[B, H, S, a] · per-kv-group [Hkv, a, b] → [B, H, S, b]; query head h uses group h // (H / Hkv).

    Heads of one group are consecutive, so [B, H, S, a] reshapes to [B, Hkv, (H/Hkv)·S, a] and one
    batched MatMul applies each group's matrix to all its query heads without duplicating weights.
    """
    if heads == kv_heads:
        return add_node(graph, "MatMul", [x, weight], f"{prefix}/matmul").outputs[0]
    a = int(weight.shape[1])  # type: ignore[index]
    grouped_shape = initializer(graph, f"{prefix}/grouped_shape", np.asarray([0, kv_heads, -1, a], dtype=np.int64))
    grouped = add_node(graph, "Reshape", [x, grouped_shape], f"{prefix}/grouped").outputs[0]
    product = add_node(graph, "MatMul", [grouped, weight], f"{prefix}/matmul").outputs[0]
    heads_shape = initializer(graph, f"{prefix}/heads_shape", np.asarray([0, heads, -1, width], dtype=np.int64))
    return add_node(graph, "Reshape", [product, heads_shape], f"{prefix}/heads").outputs[0]


class LatentLayerPass(GraphPass):
    """Runs ``apply(graph, index, rewrite)`` on every latent layer; a :class:`Decline` becomes a report note."""

    applied_note = ""
    skipped_note = ""

    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def apply(self, graph: ir.Graph, index: int, rewrite: LayerRewrite) -> None:
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        """latent_kv ran: every latent layer has its whole-sequence latent."""
        for index, rewrite in self.context.layers.items():
            if rewrite.cache == "latent" and rewrite.latent_all is None:
                raise self.precondition(f"layer {index} is latent but latent_kv left no latent of all tokens")

    def ensures(self, model: ir.Model) -> None:
        """Every latent layer was decided: rewritten, or left with the reason in its notes."""
        for index, rewrite in self.context.layers.items():
            if rewrite.cache == "latent" and not any(note.startswith((self.applied_note, self.skipped_note))
                                                     for note in rewrite.notes):
                raise self.postcondition(f"layer {index} was neither rewritten nor declined")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for index, rewrite in sorted(self.context.layers.items()):
            if rewrite.cache != "latent":
                continue
            try:
                self.apply(model.graph, index, rewrite)
            except Decline as reason:
                rewrite.notes.append(f"{self.skipped_note}: {reason}")
                continue
            rewrite.notes.append(self.applied_note)
            modified = True
        return ir.passes.PassResult(model, modified)

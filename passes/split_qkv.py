"""split_qkv: replace planned Q/K/V projections by shared down-projections and per-member up-projections.

For each factor group G of a block (plan): ``latent_G = X · W_dᵀ`` [batch, seq, r] (one MatMul), and for
each member m of G: ``y_m = latent_G · U_mᵀ (+ b_m)``; every use of the member's original output is
rewired to ``y_m``. Members outside every group keep a dense projection (for fused QKV weights a
member-sized MatMul is emitted so the fused node can be dropped). Biases are kept exactly.
The original projection nodes become dead and are removed by the cleanup at the end of the chain.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, initializer
from qsvd_export.passes.context import GraphStageContext, LayerRewrite
from qsvd_export.passes.contracts import GraphPass
from qsvd_export.plan.schema import probes_mismatch, weight_probes


class SplitQKVPass(GraphPass):
    """requires: a plan whose layers match the matched blocks (count, dims, weight probes).
    ensures: every planned factor group has its latent (one down-projection MatMul) in the graph."""

    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        plan = self.context.plan
        if plan is None:
            raise self.precondition("needs a CompressionPlan")
        if len(self.context.blocks) != len(plan.layers):
            why = f" ({self.context.failures[0].reason})" if self.context.failures else ""
            raise self.precondition("plan does not match the graph: "
                f"plan has {len(plan.layers)} layers but the graph has {len(self.context.blocks)} attention blocks{why}"
            )
        for block, layer in zip(self.context.blocks, plan.layers):
            if block.dims != layer.dims:
                raise self.precondition("plan does not match the graph: "
                    f"plan layer {layer.layer} dims {layer.dims} do not match graph block {block.index} {block.dims}"
                )
            if layer.probes is None:
                continue
            for member, projection in zip("qkv", (block.q, block.k, block.v)):
                why = probes_mismatch(layer.probes[member], weight_probes(projection.weight.T))
                if why is not None:
                    raise self.precondition("plan does not match the graph: "
                        f"plan layer {layer.layer} was computed from other {member} weights than graph block "
                        f"{block.index}: {why}{_rotation_hint(plan.method.get('residual_rotation'))}")

    def ensures(self, model: ir.Model) -> None:
        nodes = {id(n) for n in model.graph}
        for block, layer in zip(self.context.blocks, self.context.plan.layers):
            latents = self.context.layers[block.index].latents
            if len(latents) != len(layer.groups) or any(id(v.producer()) not in nodes for _, v in latents):
                raise self.postcondition(f"block {block.index}: {len(layer.groups)} groups planned, "
                                         f"{len(latents)} latents in the graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for block, layer in zip(self.context.blocks, self.context.plan.layers):
            rewrite = self.context.layers.setdefault(block.index, LayerRewrite(block))
            if not layer.groups:
                continue
            prefix = f"qsvd/layer{block.index}"
            projections = {"q": block.q, "k": block.k, "v": block.v}
            for group in layer.groups:
                down = self.context.plan.factor(layer.layer, group.members, "down").numpy()
                w_down = initializer(graph, f"{prefix}/{group.members}/down", np.ascontiguousarray(down.T))
                latent = add_node(graph, "MatMul", [block.x, w_down], f"{prefix}/{group.members}/latent").outputs[0]
                latent.dtype = ir.DataType.FLOAT
                if block.x.shape is not None:
                    latent.shape = ir.Shape([*list(block.x.shape)[:-1], down.shape[0]])
                rewrite.latents.append((group.members, latent))
                for m in group.members:
                    up = self.context.plan.factor(layer.layer, group.members, f"up_{m}").numpy()
                    bias = projections[m].bias
                    rewrite.ups[m] = (up, bias, group.members)
                    self._emit_member(graph, prefix, m, latent, up.T, bias, projections[m])
            for m in "qkv":
                if layer.group_of(m) is None and block.fused:
                    proj = projections[m]
                    self._emit_member(graph, prefix, m, block.x, proj.weight, proj.bias, proj)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _emit_member(graph: ir.Graph, prefix: str, member: str, source: ir.Value, weight: np.ndarray,
                     bias: np.ndarray | None, projection) -> None:  # type: ignore[no-untyped-def]
        w = initializer(graph, f"{prefix}/{member}/up", np.ascontiguousarray(weight.astype(np.float32)))
        out = add_node(graph, "MatMul", [source, w], f"{prefix}/{member}/proj").outputs[0]
        if bias is not None:
            b = initializer(graph, f"{prefix}/{member}/bias", bias.astype(np.float32))
            out = add_node(graph, "Add", [out, b], f"{prefix}/{member}/proj_bias").outputs[0]
        out.dtype = ir.DataType.FLOAT
        out.shape = projection.output.shape
        projection.output.replace_all_uses_with(out, replace_graph_outputs=True)
        projection.output = out


def _rotation_hint(rotation: dict | None) -> str:
    """For a plan built on residual-rotated weights: the export whose graph carries the same rotation."""
    if not rotation:
        return ""
    online = (" --rotate-mlp" if rotation.get("online_mlp_rotation") else "") + \
        (" --rotate-o-proj" if rotation.get("online_o_proj_rotation") else "")
    return (f"; the plan was built on residual-rotated weights (seed {rotation['seed']}): use the graph exported "
            f"with them (export --rotate{online} --seed {rotation['seed']})")

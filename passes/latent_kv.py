"""latent_kv: replace a layer's dense K/V cache I/O by one latent cache of width r.

Before (per layer i): ``present.i.key = Concat(past_key_values.i.key, F_k(y_k))`` and the same for
value, where y_k = X·W_k (+b) is the projection output and F_k the per-token chain after it (head
reshape/transpose, k-norm, RoPE at ``position_ids``).

After: ``latent = Concat(latent_G for cached groups)`` [batch, seq, r];
``present.i.latent = Concat(past_key_values.i.latent, latent, axis=1)`` [batch, past+seq, r];
K for all cached and new tokens is rebuilt as ``F_k(present.i.latent · U_kᵀ + b_k)`` with the chain
cloned so that RoPE uses the positions of *all* tokens, ``CumSum(attention_mask) − 1`` (the
optimum / onnxruntime-genai position convention), and V likewise. Every former use of the dense
present tensors reads the rebuilt ones; other reads of the removed cache inputs (shape queries) are
redirected to the latent input. A layer whose chain cannot be re-derived keeps its dense cache, with
the reason in the report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, clone_nodes, graph_inputs_reached, initializer, path_nodes, topo_order
from qsvd_export.passes.context import GraphStageContext, LayerRewrite
from qsvd_export.passes.contracts import Decline, GraphPass
from qsvd_export.passes.find_attention import CacheConcat


class LatentKVPass(GraphPass):
    """requires: split_qkv ran (every block has its rewrite). ensures: the latent cache I/O contract (:meth:`ensures`)."""

    def __init__(self, context: GraphStageContext, mask_input: str = "attention_mask",
                 position_input: str = "position_ids") -> None:
        super().__init__()
        self.context = context
        self.mask_input = mask_input
        self.position_input = position_input

    def requires(self, model: ir.Model) -> None:
        if self.context.plan is None:
            raise self.precondition("needs a CompressionPlan")
        missing = [b.index for b in self.context.blocks if b.index not in self.context.layers]
        if missing:
            raise self.precondition(f"split_qkv has not run on blocks {missing}")

    def ensures(self, model: ir.Model) -> None:
        """The cache I/O contract: a latent layer i reads ``past_key_values.i.latent`` and writes
        ``present.i.latent``, and its key/value cache tensors are gone from the graph's I/O."""
        inputs = {v.name for v in model.graph.inputs}
        outputs = {v.name for v in model.graph.outputs}
        for index, rewrite in self.context.layers.items():
            if rewrite.cache != "latent":
                continue
            block = rewrite.block
            if f"past_key_values.{index}.latent" not in inputs or f"present.{index}.latent" not in outputs:
                raise self.postcondition(f"layer {index} is latent but its cache I/O is not")
            assert block.k_cache is not None and block.v_cache is not None
            left = {block.k_cache.past.name, block.v_cache.past.name} & inputs
            if left:
                raise self.postcondition(f"layer {index} still takes {sorted(left)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        self._positions: ir.Value | None = None
        self._copy_dim_shapes: set[int] = set()
        for index, rewrite in sorted(self.context.layers.items()):
            cached = [(members, v) for members, v in rewrite.latents if "k" in members or "v" in members]
            block = rewrite.block
            if not cached or block.k_cache is None or block.v_cache is None:
                continue
            try:
                self._check(graph, rewrite)
            except Decline as reason:
                rewrite.notes.append(f"dense cache kept: {reason}")
                continue
            self._rewrite(graph, index, rewrite, cached)
            modified = True
        return ir.passes.PassResult(model, modified)

    # --- analysis --------------------------------------------------------------------------------
    def _chain(self, projection_output: ir.Value, cache: CacheConcat, graph: ir.Graph) -> list[ir.Node]:
        nodes = path_nodes(projection_output, cache.new)
        if cache.new is projection_output:
            return []
        if not nodes:
            raise Decline("no path from the projection to the cache Concat")
        return topo_order(nodes, graph)

    def _check(self, graph: ir.Graph, rewrite: LayerRewrite) -> None:
        block = rewrite.block
        for member, cache in (("k", block.k_cache), ("v", block.v_cache)):
            if member not in rewrite.ups:
                raise Decline(f"{member.upper()} is not in a factor group")
            assert cache is not None
            nodes = self._chain(getattr(block, member).output, cache, graph)
            inside = {id(o) for n in nodes for o in n.outputs} | {id(getattr(block, member).output)}
            for node in nodes:
                for i, value in enumerate(node.inputs):
                    if value is None or id(value) in inside:
                        continue
                    self._classify(node, i, value)
            for use in cache.past.consumers():
                if use is not cache.node and use.op_type != "Shape":
                    raise Decline(f"cache input {cache.past.name} is read by {use.op_type}")
            if cache.present.consumers() and any(u.op_type == "Shape" for u in cache.present.consumers()):
                pass
        names = {v.name for v in graph.inputs}
        if self.mask_input not in names:
            raise Decline(f"graph has no '{self.mask_input}' input to derive cached positions from")

    def _classify(self, node: ir.Node, index: int, value: ir.Value) -> str:
        reached = graph_inputs_reached(value)
        if not reached:
            return "constant"
        if node.op_type == "Reshape" and index == 1:
            out = node.outputs[0].shape
            src = node.inputs[0].shape if node.inputs[0] is not None else None
            if out is None or src is None:
                raise Decline("head reshape with unknown shapes")
            for axis, d_out in enumerate(out):
                if not isinstance(d_out, int) and (axis >= src.rank() or src[axis] != d_out):
                    raise Decline("head reshape moves a dynamic dimension")
            return "shape"
        if {v.name for v in reached} == {self.position_input}:
            return "position"
        raise Decline(f"K/V chain depends on graph input(s) {sorted(v.name for v in reached)}")

    # --- rewrite ---------------------------------------------------------------------------------
    def _all_positions(self, graph: ir.Graph) -> ir.Value:
        if self._positions is None:
            mask = next(v for v in graph.inputs if v.name == self.mask_input)
            one = initializer(graph, "qsvd/positions/one", np.asarray(1, dtype=np.int64))
            zero = initializer(graph, "qsvd/positions/zero", np.asarray(0, dtype=np.int64))
            axis = initializer(graph, "qsvd/positions/axis", np.asarray(1, dtype=np.int64))
            mask64 = add_node(graph, "Cast", [mask], "qsvd/positions/mask", {"to": ir.DataType.INT64}).outputs[0]
            cumsum = add_node(graph, "CumSum", [mask64, axis], "qsvd/positions/cumsum").outputs[0]
            minus = add_node(graph, "Sub", [cumsum, one], "qsvd/positions/minus_one").outputs[0]
            self._positions = add_node(graph, "Max", [minus, zero], "qsvd/positions/all").outputs[0]
            self._positions.dtype = ir.DataType.INT64
        return self._positions

    def _substitute(self, graph: ir.Graph, prefix: str):  # type: ignore[no-untyped-def]
        def replace(node: ir.Node, index: int, value: ir.Value | None) -> ir.Value | None:
            if value is None:
                return None
            kind = self._classify(node, index, value)
            if kind == "constant":
                return value
            if kind == "shape":  # 0 = copy that dim from the input (allowzero is reset on the clone)
                dims = [d if isinstance(d, int) else 0 for d in node.outputs[0].shape]
                shape = initializer(graph, f"{prefix}/shape", np.asarray(dims, dtype=np.int64))
                self._copy_dim_shapes.add(id(shape))
                return shape
            return self._rederive(graph, value)

        return replace

    def _rederive(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        """Clone the position-only slice behind ``value`` with position_ids → positions of all tokens."""
        if id(value) in self.context.derived:
            return self.context.derived[id(value)]
        position = next(v for v in graph.inputs if v.name == self.position_input)
        positions = self._all_positions(graph)
        if position.dtype is not None and position.dtype != ir.DataType.INT64:
            positions = add_node(graph, "Cast", [positions], f"qsvd/positions/as_{position.dtype.name}",
                                 {"to": position.dtype}).outputs[0]
        nodes = path_nodes(position, value) or []
        mapping = clone_nodes(topo_order(nodes, graph), {id(position): positions}, graph,
                              prefix=f"qsvd/all_positions/{len(self.context.derived)}")
        self.context.derived[id(value)] = mapping[id(value)]
        return mapping[id(value)]

    def _rewrite(self, graph: ir.Graph, index: int, rewrite: LayerRewrite, cached: list[tuple[str, ir.Value]]) -> None:
        block = rewrite.block
        prefix = f"qsvd/layer{index}/latent_kv"
        ranks = [(members, self.context.plan.factor(index, members, "down").shape[0]) for members, _ in cached]
        rank = sum(r for _, r in ranks)
        latent_new = cached[0][1] if len(cached) == 1 else add_node(
            graph, "Concat", [v for _, v in cached], f"{prefix}/latent_new", {"axis": -1}).outputs[0]
        k_past = block.k_cache.past  # type: ignore[union-attr]
        past = ir.Value(name=f"past_key_values.{index}.latent",
                        shape=ir.Shape([k_past.shape[0] if k_past.shape else "batch_size", "past_sequence_length", rank]),
                        type=ir.TensorType(ir.DataType.FLOAT))
        present_node = add_node(graph, "Concat", [past, latent_new], f"present.{index}.latent", {"axis": 1})
        present = present_node.outputs[0]
        present.dtype = ir.DataType.FLOAT
        present.shape = ir.Shape([past.shape[0], "total_sequence_length", rank])
        offsets, start = {}, 0
        for members, r in ranks:
            offsets[members] = (start, start + r)
            start += r
        rebuilt = {}
        for member, cache in (("k", block.k_cache), ("v", block.v_cache)):
            up, bias, members = rewrite.ups[member]
            full = np.zeros((rank, up.shape[0]), dtype=np.float32)
            lo, hi = offsets[members]
            full[lo:hi] = up.T
            rewrite.full_ups[member] = (full, bias)
            w = initializer(graph, f"{prefix}/{member}_up_all", full)
            lin = add_node(graph, "MatMul", [present, w], f"{prefix}/{member}_all").outputs[0]
            if bias is not None:
                b = initializer(graph, f"{prefix}/{member}_bias_all", bias.astype(np.float32))
                lin = add_node(graph, "Add", [lin, b], f"{prefix}/{member}_all_bias").outputs[0]
            projection_output = getattr(block, member).output
            nodes = self._chain(projection_output, cache, graph)  # type: ignore[arg-type]
            rewrite.chains[member] = nodes
            mapping = clone_nodes(nodes, {id(projection_output): lin}, graph, f"{prefix}/{member}",
                                  replace_input=self._substitute(graph, f"{prefix}/{member}"))
            for node in nodes:
                clone = mapping[id(node.outputs[0])].producer()
                if clone.op_type == "Reshape" and id(clone.inputs[1]) in self._copy_dim_shapes:
                    clone.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            rebuilt[member] = mapping[id(cache.new)] if nodes else lin  # type: ignore[union-attr]
        # Rewire: former present tensors → rebuilt, cache I/O → latent.
        inputs, outputs = graph.inputs, graph.outputs
        position_in = min(inputs.index(block.k_cache.past), inputs.index(block.v_cache.past))  # type: ignore[union-attr]
        position_out = min(outputs.index(block.k_cache.present), outputs.index(block.v_cache.present))  # type: ignore[union-attr]
        for member, cache in (("k", block.k_cache), ("v", block.v_cache)):
            assert cache is not None
            outputs.remove(cache.present)
            cache.present.replace_all_uses_with(rebuilt[member])
            graph.remove(cache.node, safe=True)
            for use in list(cache.past.consumers()):
                self._redirect_shape(graph, use, past, cache, f"{prefix}/{member}_shape")
            inputs.remove(cache.past)
        inputs.insert(position_in, past)
        present.name = f"present.{index}.latent"
        outputs.insert(position_out, present)
        rewrite.cache = "latent"
        rewrite.latent_rank = rank
        rewrite.latent_all = present
        rewrite.rebuilt = rebuilt

    @staticmethod
    def _redirect_shape(graph: ir.Graph, node: ir.Node, latent: ir.Value, cache: CacheConcat, prefix: str) -> None:
        """Shape(past dense [B, H, P, D])[start:end] → the same dims read from the latent [B, P, r]."""
        rank = cache.past.shape.rank() if cache.past.shape is not None else 4
        start = int(node.attributes["start"].value) if "start" in node.attributes else 0
        end = int(node.attributes["end"].value) if "end" in node.attributes else rank
        start, end = start % rank if start < 0 else start, (end % rank if end < 0 else min(end, rank))
        parts = []
        for axis in range(start, end):
            if axis == 0 or axis == cache.axis:
                latent_axis = 0 if axis == 0 else 1
                parts.append(add_node(graph, "Shape", [latent], f"{prefix}_{axis}_{len(graph)}",
                                      {"start": latent_axis, "end": latent_axis + 1}).outputs[0])
            else:
                dim = cache.past.shape[axis]
                parts.append(initializer(graph, f"{prefix}_{axis}", np.asarray([int(dim)], dtype=np.int64)))
        value = parts[0] if len(parts) == 1 else add_node(graph, "Concat", parts, f"{prefix}_{len(graph)}", {"axis": 0}).outputs[0]
        node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)

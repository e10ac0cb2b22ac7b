"""The graph-stage pass chain: find_attention → split_qkv → latent_kv → fold_value → absorb_key → cleanup (+ checker).

Each pass checks its preconditions (``requires``); the chain ends with dead-code removal, a
topological sort, ONNX shape inference and the ONNX checker. ``dump_dir`` saves the graph after every
pass (``NN-<pass>.onnx`` with one external data file each) for debugging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.errors import BadInputError, QsvdError
from qsvd_export.passes.context import GraphStageContext
from qsvd_export.passes.contracts import GraphPass, PassContractError
from qsvd_export.passes.absorb_key import AbsorbKeyPass
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.passes.fold_rotations import FoldRotationsPass
from qsvd_export.passes.fold_value import FoldValuePass
from qsvd_export.passes.latent_kv import LatentKVPass
from qsvd_export.passes.split_qkv import SplitQKVPass
from qsvd_export.progress import bar


class FindAttentionPass(GraphPass):
    """Analysis only: records the matched attention blocks and the reasons for non-matches.

    requires: a graph with nodes. ensures: every Softmax is either a matched block or a reported failure."""

    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        if len(model.graph) == 0:
            raise self.precondition("the graph has no nodes")

    def ensures(self, model: ir.Model) -> None:
        softmaxes = sum(1 for n in model.graph if n.op_type == "Softmax")
        fused = sum(1 for f in self.context.failures if "fused" in f.reason)
        if len(self.context.blocks) + len(self.context.failures) - fused != softmaxes:
            raise self.postcondition(f"{softmaxes} Softmax nodes, but {len(self.context.blocks)} blocks and "
                                     f"{len(self.context.failures) - fused} reasons")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        matches = find_attention(model)
        self.context.blocks = matches.blocks
        self.context.failures = matches.failures
        return ir.passes.PassResult(model, False)


class CleanupPass(GraphPass):
    """Remove dead nodes and initializers, then sort topologically.

    requires: every node input is produced by a node, a graph input or an initializer.
    ensures: nodes in topological order, and every node output read (or a graph output)."""

    def requires(self, model: ir.Model) -> None:
        self.require_closed_graph(model)

    def ensures(self, model: ir.Model) -> None:
        seen = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.initializers.values()}
        outputs = {id(v) for v in model.graph.outputs}
        for node in model.graph:
            for value in node.inputs:
                if value is not None and value.producer() is not None and id(value) not in seen:
                    raise self.postcondition("nodes are not in topological order", node)
            seen.update(id(v) for v in node.outputs)
            if not any(v.consumers() or id(v) in outputs for v in node.outputs):
                raise self.postcondition("a node's outputs are read by nothing", node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common.TopologicalSortPass()(model)  # the removal sweeps in reverse order: sort first
        common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, True)


class _Wrapped(ir.passes.PassBase):
    """A pass around ``inner``, with its in-place contract."""

    def __init__(self, inner: ir.passes.PassBase) -> None:
        super().__init__()
        self.inner = inner

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input


class _Counted(_Wrapped):
    """Runs ``inner``, then advances a progress bar."""

    def __init__(self, inner: ir.passes.PassBase, progress: Any) -> None:
        super().__init__(inner)
        self.progress = progress

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        self.progress.update()
        return result


class _Dumping(_Wrapped):
    """Wraps a pass and saves the model after it."""

    def __init__(self, inner: ir.passes.PassBase, folder: Path, index: int) -> None:
        super().__init__(inner)
        self.folder, self.index = folder, index

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        name = f"{self.index:02d}-{type(self.inner).__name__}"
        ir.save(result.model, self.folder / f"{name}.onnx", external_data=f"{name}.onnx.data")
        return result


def run_graph_stage(model: ir.Model, plan: Any | None, dump_dir: Path | None = None) -> GraphStageContext:
    """Apply ``plan`` to ``model`` in place; returns the context with per-layer outcomes."""
    context = GraphStageContext(plan)
    rotated_plan = plan is not None and bool(plan.method.get("residual_rotation"))
    passes: list[ir.passes.PassBase] = [FoldRotationsPass(context)] if rotated_plan else []
    passes.append(FindAttentionPass(context))
    if plan is not None:
        passes += [SplitQKVPass(context), LatentKVPass(context), FoldValuePass(context), AbsorbKeyPass(context)]
    passes += [CleanupPass()]
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        passes = [_Dumping(p, dump_dir, i) for i, p in enumerate(passes)]
    progress = bar(len(passes), "graph passes")
    passes = [_Counted(p, progress) for p in passes]
    try:
        ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, (ir.passes.PreconditionError, QsvdError)):
            cause = cause.__cause__
        if isinstance(cause, PassContractError):
            raise cause from None
        if isinstance(cause, ir.passes.PreconditionError):
            raise BadInputError(f"plan does not match the graph: {cause}") from None
        if isinstance(cause, QsvdError):
            raise cause from None
        raise
    finally:
        progress.close()
    check_model(model)
    return context


# onnxruntime registers these contrib ops in the ONNX domain, where the ONNX checker has no schema for them
ORT_OPS_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization"})
_UNCHECKED_DOMAIN = "qsvd_export.unchecked"


def check_model(model: ir.Model, subject: str = "graph", when: str = " after the passes") -> None:
    """ONNX checker (onnx_ir's CheckerPass moves large weights out of the proto for the check); failures
    are :class:`BadInputError` naming ``subject`` and ``when``.

    Nodes of :data:`ORT_OPS_IN_ONNX_DOMAIN` are checked as custom-domain nodes (structure only)."""
    import onnx

    for value in model.graph.initializers.values():  # small external tensors are kept in the checked proto
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= 1000:
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)
    ort_nodes = [n for n in model.graph if n.domain in ("", "ai.onnx") and n.op_type in ORT_OPS_IN_ONNX_DOMAIN]
    for node in ort_nodes:
        node.domain = _UNCHECKED_DOMAIN
    if ort_nodes:
        model.opset_imports[_UNCHECKED_DOMAIN] = 1
    try:
        common.CheckerPass()(model)
    except onnx.checker.ValidationError as err:
        raise BadInputError(f"{subject} fails the ONNX checker{when}: {str(err).splitlines()[0]}") from None
    except ir.serde.SerdeError as err:  # names or attributes that cannot be written back (e.g. invalid UTF-8)
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise BadInputError(f"{subject} cannot be serialized{when}: {str(cause).splitlines()[0][:160]}") from None
    finally:
        for node in ort_nodes:
            node.domain = ""
        model.opset_imports.pop(_UNCHECKED_DOMAIN, None)

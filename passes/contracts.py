"""Pass contracts: every graph pass states what it needs (``requires``) and what it leaves (``ensures``).

:class:`GraphPass` is an onnx_ir in-place pass whose ``requires`` / ``ensures`` raise
:class:`PassPreconditionError` / :class:`PassPostconditionError`: onnx_ir's invariant errors (so a
``PassManager`` stops on them) that are also :class:`~qsvd_export.errors.BadInputError` (one line, exit code),
naming the pass, the reason and, where there is one, the node. :class:`Decline` is the one way a pass leaves
one place of a graph as it is: its reason goes to ``report.json``; it never escapes the pass.
"""

from __future__ import annotations

import onnx_ir as ir

from qsvd_export.errors import BadInputError, QsvdError


def _where(node: ir.Node | None) -> str:
    return f" (node {node.name or node.op_type})" if node is not None else ""


class PassContractError(BadInputError):
    """A pass met a graph (or context) outside its contract: ``pass_name``, ``reason`` and the ``node``."""

    def __init__(self, pass_name: str, reason: str, node: ir.Node | None = None) -> None:
        super().__init__(f"{pass_name}: {reason}{_where(node)}")
        self.pass_name, self.reason, self.node = pass_name, reason, node


class PassPreconditionError(PassContractError, ir.passes.PreconditionError):
    """``requires`` failed: the pass did not run."""


class PassPostconditionError(PassContractError, ir.passes.PostconditionError):
    """``ensures`` failed: the pass ran and left the graph outside its promise (a bug, or an unforeseen graph)."""


class Decline(Exception):
    """A pass leaves one attention block (or one node) as it is; ``str()`` is the reason for the report."""

    def __init__(self, reason: str, node: ir.Node | None = None) -> None:
        super().__init__(reason)
        self.reason, self.node = reason, node


class GraphPass(ir.passes.InPlacePass):
    """An in-place pass with a stated contract. Subclasses implement ``call``, ``requires`` and ``ensures`` and
    report violations with :meth:`precondition` / :meth:`postcondition`."""

    def precondition(self, reason: str, node: ir.Node | None = None) -> PassPreconditionError:
        return PassPreconditionError(type(self).__name__, reason, node)

    def postcondition(self, reason: str, node: ir.Node | None = None) -> PassPostconditionError:
        return PassPostconditionError(type(self).__name__, reason, node)

    def require_closed_graph(self, model: ir.Model) -> None:
        """The precondition of a pass that rewrites what it finds: every node input is produced by a node, a graph
        input or an initializer (:func:`dangling_input`)."""
        dangling = dangling_input(model.graph)
        if dangling is not None:
            raise self.precondition(f"input {dangling[1].name!r} is produced by nothing in the graph", dangling[0])

    def requires(self, model: ir.Model) -> None:  # pragma: no cover - every subclass states its own
        raise NotImplementedError(f"{type(self).__name__} states no precondition")

    def ensures(self, model: ir.Model) -> None:  # pragma: no cover - every subclass states its own
        raise NotImplementedError(f"{type(self).__name__} states no postcondition")


def dangling_input(graph: ir.Graph) -> tuple[ir.Node, ir.Value] | None:
    """The first node input produced by no node, graph input or initializer (None: the graph is closed)."""
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.producer() is None and id(value) not in known \
                    and value.const_value is None:
                return node, value
    return None


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> None:
    """Run ``passes`` in order under onnx_ir's ``PassManager``; a contract error or any other
    :class:`~qsvd_export.errors.QsvdError` raised inside surfaces as itself (one line for the CLI)."""
    try:
        ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, QsvdError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise

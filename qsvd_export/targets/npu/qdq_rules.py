"""The npu target's QDQ tensor overrides as rules: ``(op_type, applies, override, why)`` records.

ONNX Runtime's QNN recipe (``get_qnn_qdq_config``) quantizes every activation at uint16 and every weight
per tensor unless a tensor override says otherwise. Each :class:`QdqRule` looks at one node of its
``op_type`` (``"initializer"``: at one initializer instead) and, where ``applies``, rewrites the overrides of
the tensors around it. The rules run in :data:`RULES` order, a later rule refining an earlier one's entry
(the int4 lm_head keeps int8 after the per-channel rule set the weight type). :func:`apply_rules` returns the
overrides and, per rule, its ``why`` and how many tensors it set: that goes into ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

ACTIVATIONS = frozenset({"Sigmoid", "Gelu", "Tanh", "Relu", "Erf", "Softplus", "FastGelu"})


@dataclass
class GraphFacts:
    """What the rules read off the float static graph (an ``onnx.ModelProto``) and the preset."""

    weight: Any  # QuantType of the MatMul weights
    matmul_inputs: Any | None  # a8 presets: the QuantType of the MatMuls reading the norm; None: all 16-bit
    clips: dict[str, np.ndarray] | None  # weight name → per-channel clip (MSE search), or None
    matrices: set[str]  # 2-D initializers
    shapes: dict[str, list[int]]  # initializer dims
    producers: dict[str, Any]  # tensor → producing node
    consumers: dict[str, list[str]]  # tensor → op types reading it
    graph_outputs: set[str]
    readers: dict[str, set[str]] = field(default_factory=dict)  # norm output → MatMuls converting it (a8)

    def weight_matmul(self, node: Any) -> bool:
        return node.op_type == "MatMul" and node.input[1] in self.matrices

    def writes_output(self, node: Any) -> bool:
        return node.output[0] in self.graph_outputs


Overrides = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class QdqRule:
    """One override rule: at each ``op_type`` node (or initializer name) where ``applies``, ``override`` edits the
    overrides in place and returns the tensors it set."""

    name: str
    op_type: str
    applies: Callable[[GraphFacts, Any], bool]
    override: Callable[[GraphFacts, Any, Overrides], list[str]]
    why: str


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, name)


def _rotary_tables(facts: GraphFacts, name: str, overrides: Overrides) -> list[str]:
    overrides[name] = [{"quant_type": _qtype("QUInt16")}]
    return [name]


def _per_channel(facts: GraphFacts, node: Any, overrides: Overrides) -> list[str]:
    overrides[node.input[1]] = [{"quant_type": facts.weight, "symmetric": True, "axis": 1}]
    return [node.input[1]]


def _int8_head(facts: GraphFacts, node: Any, overrides: Overrides) -> list[str]:
    overrides[node.input[1]][0]["quant_type"] = _qtype("QInt8")
    return [node.input[1]]


def _is_int4_head(facts: GraphFacts, node: Any) -> bool:
    return facts.weight_matmul(node) and facts.writes_output(node) and facts.weight == _qtype("QInt4")


def _clipped(facts: GraphFacts, node: Any, overrides: Overrides) -> list[str]:
    overrides[node.input[1]] = clipped_channels(overrides[node.input[1]][0], facts.clips[node.input[1]])  # type: ignore[index]
    return [node.input[1]]


def _reads_norm_into_8_bits(facts: GraphFacts, node: Any) -> bool:
    if facts.matmul_inputs is None or not facts.weight_matmul(node):
        return False
    source = facts.producers.get(node.input[0])
    k, n = facts.shapes[node.input[1]]
    glu_value = n > k and not set(facts.consumers.get(node.output[0], [])) & ACTIVATIONS
    return source is not None and source.op_type == "SimplifiedLayerNormalization" and not glu_value


def _eight_bit_matmul(facts: GraphFacts, node: Any, overrides: Overrides) -> list[str]:
    facts.readers.setdefault(node.input[0], set()).add(node.name)
    overrides[node.output[0]] = [{"quant_type": facts.matmul_inputs}]
    return [node.output[0]]


def clipped_channels(first: dict[str, Any], clip: np.ndarray) -> list[dict[str, Any]]:
    """Per-channel overrides with channel n's range [-clip[n], clip[n]]."""
    channels = [{"rmin": np.float32(-c), "rmax": np.float32(c)} for c in clip]
    channels[0] = {**first, **channels[0]}
    return channels


RULES: tuple[QdqRule, ...] = (
    QdqRule("rotary_tables_16_bit", "initializer",
            lambda facts, name: name.endswith(_table_suffix()), _rotary_tables,
            "rotary cos/sin tables are activations turned into constants: 16-bit like the activations they replace"),
    QdqRule("matmul_weights_per_channel", "MatMul", lambda facts, node: facts.weight_matmul(node), _per_channel,
            "symmetric per-output-channel weight scales (axis 1): the recipe's per-tensor MatMul default costs "
            "7% perplexity on smollm2 at int8, and QNN HTP compiles the per-channel form"),
    QdqRule("int4_lm_head_keeps_int8", "MatMul", _is_int4_head, _int8_head,
            "with int4 weights the MatMul writing a graph output (an untied lm_head) keeps int8, as on the cpu "
            "target (smollm2 with H1, w4a16: 1.63x dense with an int4 head)"),
    QdqRule("mse_weight_clips", "MatMul",
            lambda facts, node: facts.clips is not None and facts.weight_matmul(node)
            and node.input[1] in facts.clips and not _is_int4_head(facts, node), _clipped,
            "each output channel's range is its MSE clip instead of its absolute maximum (weight_ranges.py)"),
    QdqRule("norm_readers_at_8_bits", "MatMul", _reads_norm_into_8_bits, _eight_bit_matmul,
            "a8 presets: the MatMuls reading the RMSNorm output (q/k/v, MLP gate; 41% of smollm2's weight MACs) "
            "take and give 8-bit activations through a QNN Convert; the GLU value branch, the residual stream, "
            "the attention core and the residual writers keep 16 bits (smollm2: ppl > 1e6 with everything at "
            "8 bits; up_proj at 8 bits 1.64x, 1.026x without)"),
)


def _table_suffix() -> str:
    from qsvd_export.passes.rotary_tables import TABLE_SUFFIX

    return TABLE_SUFFIX


def apply_rules(proto: Any, weight: Any, matmul_inputs: Any | None, clips: dict[str, np.ndarray] | None,
                rules: tuple[QdqRule, ...] = RULES) -> tuple[Overrides, list[dict[str, Any]]]:
    """The tensor overrides of ``proto`` (the float static graph) and, per rule, ``{rule, why, tensors}``."""
    facts = GraphFacts(
        weight=weight, matmul_inputs=matmul_inputs, clips=clips,
        matrices={i.name for i in proto.graph.initializer if len(i.dims) == 2},
        shapes={i.name: list(i.dims) for i in proto.graph.initializer},
        producers={output: node for node in proto.graph.node for output in node.output},
        consumers={}, graph_outputs={o.name for o in proto.graph.output})
    for node in proto.graph.node:
        for name in node.input:
            facts.consumers.setdefault(name, []).append(node.op_type)
    overrides: Overrides = {}
    counts = {rule.name: 0 for rule in rules}
    initializer_rules = [r for r in rules if r.op_type == "initializer"]
    for name in facts.shapes:
        for rule in initializer_rules:
            if rule.applies(facts, name):
                counts[rule.name] += len(rule.override(facts, name, overrides))
    node_rules = [r for r in rules if r.op_type != "initializer"]
    for node in proto.graph.node:
        for rule in node_rules:
            if rule.op_type == node.op_type and rule.applies(facts, node):
                counts[rule.name] += len(rule.override(facts, node, overrides))
    for tensor, nodes in facts.readers.items():  # the norm output stays 16-bit, converted for its 8-bit readers
        overrides[tensor] = [{"quant_type": _qtype("QUInt16"),
                              "convert": {"quant_type": matmul_inputs, "recv_nodes": nodes}}]
    return overrides, [{"rule": r.name, "why": r.why, "tensors": counts[r.name]} for r in rules]

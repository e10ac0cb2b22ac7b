"""The npu QDQ override rules on a hand-built graph: norm → q (square) and up (expanding, no activation after it)
MatMuls, an lm_head writing the graph output, a rotary table; each rule's effect and its count in the report."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType

from qsvd_export.passes.rotary_tables import TABLE_SUFFIX
from qsvd_export.targets.npu.qdq_rules import RULES, QdqRule, apply_rules


def _graph():
    def init(name, shape):
        return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)

    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["normed"], name="norm"),
        helper.make_node("MatMul", ["normed", "w_q"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["normed", "w_up"], ["up"], name="up_proj"),
        helper.make_node("MatMul", ["q", "w_head"], ["logits"], name="lm_head"),
        helper.make_node("Mul", ["up", f"cos{TABLE_SUFFIX}"], ["unused"], name="table_reader"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
                              [init("gamma", [4]), init("w_q", [4, 4]), init("w_up", [4, 8]), init("w_head", [4, 4]),
                               init(f"cos{TABLE_SUFFIX}", [1, 8])])
    return helper.make_model(graph)


def _counts(report):
    return {row["rule"]: row["tensors"] for row in report}


def test_int8_weights_16_bit_activations():
    overrides, report = apply_rules(_graph(), QuantType.QInt8, None, None)
    assert overrides["w_q"] == [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]
    assert overrides[f"cos{TABLE_SUFFIX}"] == [{"quant_type": QuantType.QUInt16}]
    assert "q" not in overrides and "normed" not in overrides  # everything else: the recipe's uint16
    assert _counts(report) == {"rotary_tables_16_bit": 1, "matmul_weights_per_channel": 3, "int4_lm_head_keeps_int8": 0,
                               "mse_weight_clips": 0, "norm_readers_at_8_bits": 0}
    assert all(row["why"] for row in report)


def test_int4_a8_preset_head_clips_and_norm_readers():
    clips = {"w_q": np.full(4, 0.5, dtype=np.float32), "w_head": np.full(4, 0.5, dtype=np.float32)}
    overrides, report = apply_rules(_graph(), QuantType.QInt4, QuantType.QUInt8, clips)
    assert overrides["w_head"] == [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]  # head: int8, unclipped
    assert len(overrides["w_q"]) == 4 and overrides["w_q"][0]["quant_type"] == QuantType.QInt4
    assert overrides["w_q"][2] == {"rmin": np.float32(-0.5), "rmax": np.float32(0.5)}
    assert overrides["q"] == [{"quant_type": QuantType.QUInt8}]  # q reads the norm: 8-bit out
    assert "up" not in overrides  # the GLU value branch stays 16-bit
    assert overrides["normed"] == [{"quant_type": QuantType.QUInt16,
                                    "convert": {"quant_type": QuantType.QUInt8, "recv_nodes": {"q_proj"}}}]
    assert _counts(report)["int4_lm_head_keeps_int8"] == 1 and _counts(report)["mse_weight_clips"] == 1
    assert _counts(report)["norm_readers_at_8_bits"] == 1


def test_a_rule_is_a_record():
    extra = QdqRule("mul_inputs_16_bit", "Mul", lambda facts, node: True,
                    lambda facts, node, overrides: [overrides.setdefault(node.input[0], [{"quant_type": "u16"}]) and
                                                    node.input[0]], "a test's rule")
    overrides, report = apply_rules(_graph(), QuantType.QInt8, None, None, rules=(*RULES, extra))
    assert overrides["up"] == [{"quant_type": "u16"}] and report[-1] == {"rule": "mul_inputs_16_bit",
                                                                          "why": "a test's rule", "tensors": 1}

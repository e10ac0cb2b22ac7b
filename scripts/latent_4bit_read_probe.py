"""Isolated ONNX Runtime timing of one layer's latent cache read at decode (2 threads), three forms.

    python scripts/latent_4bit_read_probe.py [CONTEXT]     (prints one JSON line; ms per call, median of 5 × 200)

- ``eight_bit``: 8-bit codes [1, T, r]: MatMulIntegerToFloat key rebuild + per-tensor DequantizeLinear view + the
  attention-weighted MatMul (stop 31's read);
- ``unpack``: 4-bit codes packed [1, T, r/2]: BitwiseAnd / BitShift / Concat, then the same (stop 32's read);
- ``unpack_free``: the derived form without BitShift or the unpacked copy: keys from MIF(low nibble, W1) +
  MIF(packed byte, W2, bias), the weighted latent from P·(low − 8) and P·(p − 128)/16 (docs/decisions.md).
r = 192, N = 192, 9 heads, random codes and weights (timing only).
"""
import json
import sys
import time

import numpy as np
import onnx.helper as h
import onnxruntime as ort
from onnx import TensorProto as T, numpy_helper as nh

T_, r, N, H = int(sys.argv[1]) if len(sys.argv) > 1 else 2048, 192, 192, 9
hh = r // 2
rng = np.random.default_rng(0)
def c(name, a): return nh.from_array(np.asarray(a), name)
inits = [c("W", rng.integers(-127, 127, (r, N)).astype(np.int8)), c("W1", rng.integers(-127, 127, (hh, N)).astype(np.int8)),
         c("W2", rng.integers(-127, 127, (hh, N)).astype(np.int8)), c("one", np.float32(1)), c("col", np.ones(N, np.float32)),
         c("z8", np.uint8(8)), c("z128", np.uint8(128)), c("m15", np.uint8(15)), c("four", np.uint8(4)),
         c("bias", np.zeros(N, np.float32)), c("sixteenth", np.float32(1 / 16)), c("half", np.float32(0.5)),
         c("ax", np.array([1], np.int64)), c("axm", np.array([-1], np.int64))]
def unpack_form():
    return [h.make_node("BitwiseAnd", ["p", "m15"], ["lo"]), h.make_node("BitShift", ["p", "four"], ["hi"], direction="RIGHT"),
            h.make_node("Concat", ["lo", "hi"], ["codes"], axis=2),
            h.make_node("MatMulIntegerToFloat", ["codes", "W", "one", "col", "z8"], ["k"], domain="com.microsoft"),
            h.make_node("DequantizeLinear", ["codes", "one", "z8"], ["view"]),
            h.make_node("Unsqueeze", ["view", "ax"], ["view4"]), h.make_node("MatMul", ["P", "view4"], ["w"])]
def free_form():
    return [h.make_node("BitwiseAnd", ["p", "m15"], ["lo"]),
            h.make_node("MatMulIntegerToFloat", ["lo", "W1", "one", "col", "z8"], ["k1"], domain="com.microsoft"),
            h.make_node("MatMulIntegerToFloat", ["p", "W2", "one", "col", "z128", "", "bias"], ["k2"], domain="com.microsoft"),
            h.make_node("Add", ["k1", "k2"], ["k"]),
            h.make_node("DequantizeLinear", ["lo", "one", "z8"], ["vlo"]),
            h.make_node("DequantizeLinear", ["p", "sixteenth", "z128"], ["vp"]),
            h.make_node("Unsqueeze", ["vlo", "ax"], ["vlo4"]), h.make_node("Unsqueeze", ["vp", "ax"], ["vp4"]),
            h.make_node("MatMul", ["P", "vlo4"], ["wl"]), h.make_node("MatMul", ["P", "vp4"], ["wp"]),
            h.make_node("ReduceSum", ["P", "axm"], ["sp"], keepdims=1),
            h.make_node("Mul", ["wl", "sixteenth"], ["wl16"]), h.make_node("Mul", ["sp", "half"], ["sp2"]),
            h.make_node("Sub", ["wp", "wl16"], ["d1"]), h.make_node("Sub", ["d1", "sp2"], ["wh"]),
            h.make_node("Concat", ["wl", "wh"], ["w"], axis=-1)]
def eight_form():
    return [h.make_node("MatMulIntegerToFloat", ["p8", "W", "one", "col", "z128"], ["k"], domain="com.microsoft"),
            h.make_node("DequantizeLinear", ["p8", "one", "z128"], ["view"]),
            h.make_node("Unsqueeze", ["view", "ax"], ["view4"]), h.make_node("MatMul", ["P", "view4"], ["w"])]
def session(nodes):
    first = "p8" if nodes[0].input[0] == "p8" else "p"
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(first, T.UINT8, [1, None, r if first == "p8" else hh]), h.make_tensor_value_info("P", T.FLOAT, [1, H, 1, None])],
                     [h.make_tensor_value_info("k", T.FLOAT, None), h.make_tensor_value_info("w", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
feed = {"p": rng.integers(0, 256, (1, T_, hh)).astype(np.uint8), "P": np.full((1, H, 1, T_), 1 / T_, np.float32)}
out = {"context": T_, "rank": r, "columns": N, "heads": H}
feed8 = {"p8": rng.integers(0, 256, (1, T_, r)).astype(np.uint8), "P": feed["P"]}
for name, nodes in (("eight_bit", eight_form()), ("unpack", unpack_form()), ("unpack_free", free_form())):
    s = session(nodes)
    f = feed8 if name == "eight_bit" else feed
    [s.run(None, f) for _ in range(20)]
    times = []
    for _ in range(5):
        t = time.perf_counter(); [s.run(None, f) for _ in range(200)]; times.append((time.perf_counter() - t) / 200 * 1e3)
    out[name + "_ms"] = round(float(np.median(times)), 4)
print(json.dumps(out))

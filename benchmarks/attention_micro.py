"""One decode step of attention, as our graphs write it vs onnxruntime's fused GroupQueryAttention.

    python -m benchmarks.attention_micro [--heads 9 --kv-heads 3 --head-dim 64] [--contexts 512 2048]

Decomposed = what an exported decoder layer runs per token: cache Concat, GQA Expand + Reshape of K and V to
the query heads, QKᵀ, scale, Softmax, PV. Fused = ``com.microsoft.GroupQueryAttention`` over the same
[B, kv_heads, past, head_dim] cache (no rotary inside). Prints ms per call (median of 200 after warm-up)
and the max |Δ| of the outputs, one line per context. Decides whether the cpu target should rewrite
attention into GroupQueryAttention (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _info(name: str, shape: list) -> object:  # type: ignore[type-arg]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def fused(heads: int, kv_heads: int, dim: int) -> bytes:
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"], ["o", "nk", "nv"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)
    graph = helper.make_graph([node], "fused", [
        _info("q", [1, 1, heads * dim]), _info("k", [1, 1, kv_heads * dim]), _info("v", [1, 1, kv_heads * dim]),
        _info("pk", [1, kv_heads, "P", dim]), _info("pv", [1, kv_heads, "P", dim]),
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [_info("o", None), _info("nk", None), _info("nv", None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def decomposed(heads: int, kv_heads: int, dim: int) -> bytes:
    make = helper.make_node
    nodes = [make("Concat", ["pk", "k"], ["K"], axis=2), make("Concat", ["pv", "v"], ["V"], axis=2)]
    for x in ("K", "V"):
        nodes += [make("Unsqueeze", [x, "axis"], [f"{x}5"]), make("Shape", [f"{x}5"], [f"{x}s"]),
                  make("Mul", [f"{x}s", "repeat"], [f"{x}r"]), make("Expand", [f"{x}5", f"{x}r"], [f"{x}e"]),
                  make("Reshape", [f"{x}e", "heads"], [f"{x}h"])]
    nodes += [make("Transpose", ["Kh"], ["Kt"], perm=[0, 1, 3, 2]), make("MatMul", ["q", "Kt"], ["s"]),
              make("Mul", ["s", "scale"], ["s2"]), make("Softmax", ["s2"], ["p"], axis=-1),
              make("MatMul", ["p", "Vh"], ["o"])]
    constants = [helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("repeat", TensorProto.INT64, [5], [1, 1, heads // kv_heads, 1, 1]),
                 helper.make_tensor("heads", TensorProto.INT64, [4], [1, heads, -1, dim]),
                 helper.make_tensor("scale", TensorProto.FLOAT, [], [dim ** -0.5])]
    graph = helper.make_graph(nodes, "decomposed", [
        _info("q", [1, heads, 1, dim]), _info("k", [1, kv_heads, 1, dim]), _info("v", [1, kv_heads, 1, dim]),
        _info("pk", [1, kv_heads, "P", dim]), _info("pv", [1, kv_heads, "P", dim])],
        [_info("o", None), _info("K", None), _info("V", None)], initializer=constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _median_ms(session: ort.InferenceSession, feed: dict, runs: int = 200) -> float:  # type: ignore[type-arg]
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    h, kv, d = args.heads, args.kv_heads, args.head_dim
    plain = ort.InferenceSession(decomposed(h, kv, d), options, providers=["CPUExecutionProvider"])
    gqa = ort.InferenceSession(fused(h, kv, d), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for context in args.contexts:
        past = context - 1
        pk, pv = (rng.standard_normal((1, kv, past, d)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((1, h, 1, d)).astype(np.float32)
        k, v = (rng.standard_normal((1, kv, 1, d)).astype(np.float32) for _ in range(2))
        flat = {"q": q.transpose(0, 2, 1, 3).reshape(1, 1, -1), "k": k.transpose(0, 2, 1, 3).reshape(1, 1, -1),
                "v": v.transpose(0, 2, 1, 3).reshape(1, 1, -1)}
        plain_feed = {"q": q, "k": k, "v": v, "pk": pk, "pv": pv}
        gqa_feed = {**flat, "pk": pk, "pv": pv, "seqlens": np.array([past], np.int32),
                    "total": np.array(context, np.int32)}
        diff = np.abs(plain.run(None, plain_feed)[0].transpose(0, 2, 1, 3).reshape(1, 1, -1)
                      - gqa.run(None, gqa_feed)[0]).max()
        print(json.dumps({"context": context, "decomposed_ms": round(_median_ms(plain, plain_feed), 4),
                          "group_query_attention_ms": round(_median_ms(gqa, gqa_feed), 4),
                          "max_abs_diff": float(diff)}))


if __name__ == "__main__":
    main()

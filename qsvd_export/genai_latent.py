"""A latent bundle in onnxruntime-genai: ``model.genai.onnx``, the same graph with each latent shown as key/value.

genai's default KV cache binds exactly ``past_key_values.{i}.key|value`` of shape ``[batch, heads,
past_sequence_length, head_size]`` with key and value of one shape (``src/models/kv_cache.cpp``; heads and head
size may vary by layer in 0.18). A QSVD bundle caches one latent per layer, ``past_key_values.{i}.latent``
``[batch, past_sequence_length, r]`` (float32, or uint8 codes with static scales inside the graph). The genai
graph presents it as two halves of h = ⌈r/2⌉ channels, one KV head each:

- input side: ``Squeeze(Slice(Concat(key, value, axis=3), [0, r), axis 3), axis 1)`` is named like the old latent
  input, so every reader of the latent is unchanged;
- output side: ``present.{i}.latent`` → ``Unsqueeze(axis 1)`` → (odd r: ``Pad`` one zero channel) → ``Split`` into
  ``present.{i}.key`` / ``.value``.

The byte count per token is the latent's, plus one code per token for an odd r. Weights are not copied: the
genai graph's initializers point at the bundle's ``model.onnx.data`` (the proto is edited without loading them).
Bundles whose layers cache anything else (the 4-bit latent's packed codes plus its float32 sink) are refused by
:func:`latent_view` with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qsvd_export.bundle import BundleConfig, CacheTensor, LayerCache
from qsvd_export.errors import BadInputError

GENAI_GRAPH = "model.genai.onnx"
_LATENT = re.compile(r"past_key_values\.(\d+)\.latent$")


def latent_view(config: BundleConfig) -> list[LayerCache] | str:
    """The key/value cache genai binds for a bundle that caches exactly one latent per layer, or why there is none
    ("" is never returned). Layers caching a dense key/value pair are not touched (returned as they are); the
    view's dtypes are checked with the other key/value caches (``genai_config._cache_refusal``)."""
    view = []
    for layer in config.cache:
        names = [t.input for t in layer.tensors]
        if layer.kind != "latent":
            view.append(layer)
            continue
        if len(layer.tensors) != 1 or not _LATENT.fullmatch(names[0]):
            return (f"layer {layer.layer} caches {', '.join(names)}: genai binds one key/value pair per layer, "
                    "and a latent cache with a second tensor (the 4-bit latent's float32 sink) has no slot for it")
        tensor = layer.tensors[0]
        if len(tensor.shape) != 3 or tensor.sequence_axis != 1 or not isinstance(tensor.shape[2], int):
            return f"{tensor.input} is {tensor.shape}: a latent shown to genai must be [batch, past, r] with a static r"
        half = (tensor.shape[2] + 1) // 2
        shape = [tensor.shape[0], 1, tensor.shape[1], half]
        view.append(LayerCache(layer.layer, "latent", [
            CacheTensor(f"past_key_values.{layer.layer}.{part}", f"present.{layer.layer}.{part}", list(shape),
                        tensor.dtype, 2) for part in ("key", "value")], layer.rank))
    return view


def write_genai_graph(folder: Path, config: BundleConfig) -> str:
    """Write ``folder/model.genai.onnx`` for a bundle :func:`latent_view` accepts; returns its file name."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    spec = config.graph("model")
    proto = onnx.load(str(Path(folder) / spec.filename), load_external_data=False)
    graph = proto.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    head, tail, new_inputs, new_outputs = [], [], [], []

    def constant(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    for layer in config.cache:
        if layer.kind != "latent":
            continue
        tensor, i = layer.tensors[0], layer.layer
        rank, half = int(tensor.shape[2]), (int(tensor.shape[2]) + 1) // 2
        if tensor.input not in inputs or tensor.output not in outputs:
            raise BadInputError(f"{spec.filename}: no {tensor.input} / {tensor.output} to show to genai")
        old_in, old_out = inputs.pop(tensor.input), outputs.pop(tensor.output)
        elem = old_in.type.tensor_type.elem_type
        batch, past = old_in.type.tensor_type.shape.dim[0], old_in.type.tensor_type.shape.dim[1]
        total = old_out.type.tensor_type.shape.dim[1]
        prefix = f"genai/{i}"
        for part in ("key", "value"):
            new_inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{part}", elem, [batch.dim_param or batch.dim_value, 1,
                                                      past.dim_param or past.dim_value, half]))
            new_outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{part}", elem, [batch.dim_param or batch.dim_value, 1, total.dim_param or total.dim_value,
                                             half]))
        joined = f"{prefix}/joined"
        head.append(helper.make_node("Concat", [f"past_key_values.{i}.key", f"past_key_values.{i}.value"], [joined],
                                     name=f"{prefix}/concat", axis=3))
        if 2 * half != rank:
            head.append(helper.make_node("Slice", [joined, constant(f"{prefix}/zero", [0]),
                                                   constant(f"{prefix}/rank", [rank]), constant(f"{prefix}/axis3", [3])],
                                         [f"{prefix}/sliced"], name=f"{prefix}/slice"))
            joined = f"{prefix}/sliced"
        head.append(helper.make_node("Squeeze", [joined, constant(f"{prefix}/axis1", [1])], [tensor.input],
                                     name=f"{prefix}/squeeze"))
        shown = f"{prefix}/present"
        tail.append(helper.make_node("Unsqueeze", [tensor.output, f"{prefix}/axis1"], [shown],
                                     name=f"{prefix}/unsqueeze"))
        if 2 * half != rank:
            tail.append(helper.make_node("Pad", [shown, constant(f"{prefix}/pads", [0, 0, 0, 0, 0, 0, 0, 1])],
                                         [f"{prefix}/padded"], name=f"{prefix}/pad"))
            shown = f"{prefix}/padded"
        tail.append(helper.make_node("Split", [shown, constant(f"{prefix}/halves", [half, half])],
                                     [f"present.{i}.key", f"present.{i}.value"], name=f"{prefix}/split", axis=3))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    kept_inputs = [v for v in graph.input if v.name in inputs]
    del graph.input[:]
    graph.input.extend(kept_inputs + new_inputs)
    kept_outputs = [v for v in graph.output if v.name in outputs]
    del graph.output[:]
    graph.output.extend(kept_outputs + new_outputs)
    path = Path(folder) / GENAI_GRAPH
    partial = path.with_name(path.name + ".partial")
    onnx.save(proto, str(partial))  # initializers keep their external_data entries: model.onnx.data is shared
    os.replace(partial, path)
    return GENAI_GRAPH

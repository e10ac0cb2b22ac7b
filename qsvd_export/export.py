"""Dense export: transformers model → ONNX (torch dynamo exporter, opset 21) with explicit cache I/O.

Decoder graph contract (optimum / onnxruntime-genai names):
  inputs  ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq],
          ``position_ids`` int64 [batch, seq],
          ``past_key_values.{i}.key|value`` float32 [batch, kv_heads, past, head_dim]
  outputs ``logits`` float32 [batch, seq, vocab], ``present.{i}.key|value`` [batch, kv_heads, past+seq, head_dim]
One graph serves prefill (past = 0) and decode. ``attention_mask`` covers past and new tokens
(1 = attend, 0 = padding); the graph builds the causal (and sliding-window) additive mask itself.

Encoder graph: ``input_ids``, ``attention_mask``, ``token_type_ids`` → ``last_hidden_state``.
Vision graph: ``pixel_values`` [batch, channels, H, W] → ``last_hidden_state``.
Vision-language models (:func:`export_vlm`): three graphs, ``vision`` (``pixel_values`` [frames, 3, S, S] →
``image_features``), ``embed`` (``input_ids`` → ``inputs_embeds``) and the decoder above with
``inputs_embeds`` [batch, seq, hidden] float32 in place of ``input_ids``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.bundle import CacheTensor, LayerCache
from qsvd_export.errors import UnsupportedModelError
from qsvd_export.models import adapter_for_config
from qsvd_export.progress import bar
from qsvd_export.loaded import LoadedModel

OPSET = 21

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass
class ExportedGraph:
    """An exported graph with the I/O contract the bundle config records."""

    model: ir.Model
    inputs: list[str]
    outputs: list[str]
    cache: list[LayerCache]


def additive_causal_mask(attention_mask: Any, query_length: int, sliding_window: int | None, dtype: Any) -> Any:
    """[batch, total] 0/1 padding mask → [batch, 1, query, total] additive mask (0 keep, dtype-min drop).

    ``attention_mask`` must hold 0/1 values.

    Query ``i`` sits at cache position ``total - query + i``; it may attend key ``j`` iff
    ``j <= pos_i``, ``attention_mask[j] == 1`` and, for sliding layers, ``pos_i - j < window``.
    """
    import torch

    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    allowed = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None] - key_pos[None, :] < sliding_window)
    # Float arithmetic, no boolean ops on the input: once shapes are static the causal part folds to a
    # constant and the graph holds only Cast/Mul/Sub, which NPU compilers run (QNN HTP has no bool Select).
    keep = allowed.to(dtype)[None, None, :, :] * attention_mask.to(dtype)[:, None, None, :]
    return (1.0 - keep) * torch.finfo(dtype).min


def _decoder_wrapper(model: Any, adapter: Any, embeds: bool = False) -> Any:
    """``model`` (a causal LM, or :class:`~qsvd_export.models.vlm.EmbeddingsCausalLM` with ``embeds``) with the
    cache as flat (key, value) pairs and the additive mask built from the 2D ``attention_mask``."""
    import torch
    from transformers import DynamicCache

    config = model.config
    layer_types = adapter.layer_types(config)
    window = adapter.sliding_window(config)
    uses_mapping = "sliding_attention" in layer_types
    first = "inputs_embeds" if embeds else "input_ids"

    class DecoderForExport(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, attention_mask, position_ids, past):  # type: ignore[no-untyped-def]
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
            query_length = tokens.shape[1]
            dtype = self.model.dtype
            full = additive_causal_mask(attention_mask, query_length, None, dtype)
            if uses_mapping:
                mask: Any = {
                    "full_attention": full,
                    "sliding_attention": additive_causal_mask(attention_mask, query_length, window, dtype),
                }
            else:
                mask = full
            out = self.model(**{first: tokens}, attention_mask=mask, position_ids=position_ids, cache=cache,
                             use_cache=True)
            present = [(layer.keys, layer.values) for layer in out.cache.layers]
            return out.logits, present

    return DecoderForExport()


def _encoder_wrapper(model: Any) -> Any:
    import torch

    class EncoderForExport(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            dtype = self.model.dtype
            keep = attention_mask[:, None, None, :] > 0
            mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
            out = self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    return EncoderForExport()


def _vision_wrapper(model: Any) -> Any:
    import torch

    class VisionForExport(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):  # type: ignore[no-untyped-def]
            return self.model(pixel_values=pixel_values).last_hidden_state

    return VisionForExport()


def decoder_cache_layout(config: Any) -> list[LayerCache]:
    """Dense cache entries for every decoder layer (DESIGN.md §6)."""
    adapter = adapter_for_config(config)
    kv_heads, head_dim = adapter.num_kv_heads(config), adapter.head_dim(config)
    layers = []
    for i in range(adapter.num_layers(config)):
        tensors = [
            CacheTensor(
                input=f"past_key_values.{i}.{part}",
                output=f"present.{i}.{part}",
                shape=[BATCH, kv_heads, PAST, head_dim],
                dtype="float32",
                sequence_axis=2,
            )
            for part in ("key", "value")
        ]
        layers.append(LayerCache(layer=i, kind="dense", tensors=tensors))
    return layers


def cache_dtype_name(dtype: ir.DataType) -> str:
    """The numpy-style name a bundle config uses for a cache dtype (``float32``, ``float16``, ``uint8``)."""
    name = dtype.name.lower()
    return {"float": "float32"}.get(name, name)


def sync_cache_dtypes(cache: list[LayerCache], model: ir.Model) -> None:
    """Set each cache tensor's dtype to the one ``model`` declares for its input (a target stage such as
    the gpu's fp16 conversion changes them)."""
    dtypes = {v.name: cache_dtype_name(v.dtype) for v in model.graph.inputs if v.dtype is not None}
    for layer in cache:
        for tensor in layer.tensors:
            tensor.dtype = dtypes.get(tensor.input, tensor.dtype)


def cache_layout_from_graph(model: ir.Model) -> list[LayerCache]:
    """Cache entries read off a graph's I/O: ``past_key_values.{i}.key|value|latent`` → ``present.{i}.*``.

    Dense tensors are [batch, heads, past, head_dim] (sequence axis 2), latent ones [batch, past, r]
    (sequence axis 1). Non-sequence, non-batch dims must be static.
    """
    import re

    pattern = re.compile(r"^past_key_values\.(\d+)\.(key|value|latent)$")
    outputs = {v.name for v in model.graph.outputs}
    layers: dict[int, LayerCache] = {}
    for value in model.graph.inputs:
        match = pattern.match(value.name or "")
        if not match:
            continue
        index, part = int(match.group(1)), match.group(2)
        output = f"present.{index}.{part}"
        if output not in outputs:
            raise UnsupportedModelError(f"cache input {value.name} has no matching output {output}")
        sequence_axis = 1 if part == "latent" else 2
        shape: list[str | int] = []
        for axis, dim in enumerate(value.shape or []):
            if axis == 0:
                shape.append(BATCH)
            elif axis == sequence_axis:
                shape.append(PAST)
            elif isinstance(dim, int):
                shape.append(dim)
            else:
                raise UnsupportedModelError(f"cache input {value.name} has a dynamic dim at axis {axis}")
        dtype = cache_dtype_name(value.dtype or ir.DataType.FLOAT)
        layer = layers.setdefault(index, LayerCache(layer=index, kind="latent" if part == "latent" else "dense", tensors=[]))
        layer.tensors.append(CacheTensor(value.name, output, shape, dtype, sequence_axis))
        if part == "latent":
            layer.rank = int(shape[-1])  # type: ignore[arg-type]
    return [layers[i] for i in sorted(layers)]


def _run_exporter(wrapper: Any, args: tuple, input_names: list[str], output_names: list[str], dynamic: Any,
                  weight_files: tuple[Any, Path] | None = None) -> ir.Model:
    import torch

    # The exporter prints progress and warns about optional ops (torchvision); keep the CLI output clean.
    sink = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # one step: the exporter optimizes before it renames inputs and axes, so it cannot be split in two
    progress = bar(1, "export (torch.export, decompositions, onnxscript optimizer)")
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, input_names=input_names, output_names=output_names, dynamic_shapes=dynamic,
            dynamo=True, opset_version=OPSET, optimize=False, verbose=False, report=False,
        )
        if weight_files is not None:
            read_weights_from_files(program.model, *weight_files)
        defer_weight_transposes(program.model)
        program.optimize()  # the exporter's own optimizer (onnxscript), now with no weight left to transpose
    progress.update()
    progress.close()
    model = program.model
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        # source file paths of this installation: bundles would differ by where qsvd-export is installed
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    model.producer_name = "qsvd-export"
    return model


def read_weights_from_files(model: ir.Model, torch_model: Any, folder: Path) -> int:
    """Back every initializer that is a float32 parameter of ``torch_model`` stored unchanged (same key,
    dtype and shape) in ``folder``'s safetensors files by that file instead: an uncached ``LazyTensor``
    that reads the one tensor when it is needed. The torch model can then be released before the graph is
    written. Only valid while the weights equal the files (not after rotation or smoothing). Returns the
    number of initializers now read from files."""
    import torch
    from safetensors import safe_open

    stored: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                stored[key] = (file, piece.get_dtype(), tuple(piece.get_shape()))
    names: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in torch_model.state_dict(keep_vars=True).items():
        if name in stored:
            names.setdefault((tensor.data_ptr(), tuple(tensor.shape)), name)
    count = 0
    for value in model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.float32 or raw.numel() == 0:
            continue
        name = names.get((raw.data_ptr(), tuple(raw.shape)))
        if name is None or stored[name][1:] != ("F32", tuple(raw.shape)):
            continue

        def read(file: Path = stored[name][0], key: str = name) -> ir.TensorProtocol:
            with safe_open(str(file), framework="numpy") as handle:
                return ir.tensor(handle.get_tensor(key))

        value.const_value = ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape(raw.shape))
        count += 1
    return count


def defer_weight_transposes(model: ir.Model) -> int:
    """Replace each ``Transpose(W)`` of an initializer W with no other use by an initializer holding Wᵀ,
    computed on demand (onnx_ir ``LazyTensor``, not cached). Returns the number replaced.

    The exporter writes ``nn.Linear`` as ``MatMul(x, Transpose(W))`` and its optimizer folds every such
    Transpose into a new in-memory array: a copy of nearly all weights next to the torch model's. Lazily
    transposed, each weight is materialized only while ``ir.save`` writes it (or a pass reads it).
    The graph is the same as the folded one: the initializer takes the Transpose output's name."""
    replaced = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source, output = node.inputs[0], node.outputs[0]
        if (source is None or not source.is_initializer() or source.const_value is None or len(source.uses()) != 1
                or source.is_graph_output() or output.is_graph_output()):
            continue
        tensor = source.const_value
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(tensor.shape))))
        shape = ir.Shape([tensor.shape[axis] for axis in perm])

        def transposed(tensor: ir.TensorProtocol = tensor, perm: tuple[int, ...] = perm) -> ir.TensorProtocol:
            import numpy as np

            return ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)))

        name = output.name
        value = ir.Value(name=f"{name}.deferred", shape=shape, type=ir.TensorType(tensor.dtype),
                         const_value=ir.LazyTensor(transposed, dtype=tensor.dtype, shape=shape))
        output.replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        model.graph.initializers.pop(source.name)  # type: ignore[arg-type]
        source.const_value = None  # the detached value stays referenced by the graph's bookkeeping
        value.name = name
        model.graph.register_initializer(value)
        replaced += 1
    return replaced


def export_decoder(loaded: LoadedModel, from_files: bool = False) -> ExportedGraph:
    return export_causal_lm(loaded.model, _weight_files(loaded, from_files))


def export_causal_lm(model: Any, weight_files: tuple[Any, Path] | None = None, embeds: bool = False) -> ExportedGraph:
    """The decoder graph of ``model`` (a causal LM: ``model.config`` is its text config); with ``embeds`` its
    first input is ``inputs_embeds`` float32 [batch, seq, hidden] instead of ``input_ids``."""
    import torch

    config = model.config
    adapter = adapter_for_config(config)
    layers = decoder_cache_layout(config)
    n_layers = len(layers)
    kv_heads, head_dim = adapter.num_kv_heads(config), adapter.head_dim(config)
    # Trace with sizes > 1 so the exporter does not specialize batch / seq / past to constants.
    batch, seq, past = 2, 3, 4
    if embeds:
        tokens = torch.randn(batch, seq, int(config.hidden_size))
    else:
        tokens = torch.randint(0, int(config.vocab_size), (batch, seq))
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    cache = [
        (torch.zeros(batch, kv_heads, past, head_dim), torch.zeros(batch, kv_heads, past, head_dim))
        for _ in range(n_layers)
    ]
    b, s, p, t = (torch.export.Dim(n) for n in (BATCH, SEQ, PAST, TOTAL))
    dynamic = {
        "tokens": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(n_layers)],
    }
    cache_inputs = [tensor.input for layer in layers for tensor in layer.tensors]
    cache_outputs = [tensor.output for layer in layers for tensor in layer.tensors]
    inputs = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids", *cache_inputs]
    outputs = ["logits", *cache_outputs]
    wrapper = _decoder_wrapper(model, adapter, embeds)
    onnx_model = _run_exporter(wrapper, (tokens, attention_mask, position_ids, cache), inputs, outputs, dynamic,
                               weight_files)
    return ExportedGraph(onnx_model, inputs, outputs, layers)


def export_encoder(loaded: LoadedModel, from_files: bool = False) -> ExportedGraph:
    import torch

    config = loaded.model.config
    batch, seq = 2, 5
    input_ids = torch.randint(0, int(config.vocab_size), (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    token_type_ids = torch.zeros(batch, seq, dtype=torch.int64)
    b, s = torch.export.Dim(BATCH), torch.export.Dim(SEQ)
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "token_type_ids": {0: b, 1: s}}
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    outputs = ["last_hidden_state"]
    onnx_model = _run_exporter(
        _encoder_wrapper(loaded.model), (input_ids, attention_mask, token_type_ids), inputs, outputs, dynamic,
        _weight_files(loaded, from_files),
    )
    return ExportedGraph(onnx_model, inputs, outputs, [])


def export_vision(loaded: LoadedModel, from_files: bool = False) -> ExportedGraph:
    import torch

    config = loaded.model.config
    size = int(config.image_size)
    pixel_values = torch.randn(2, int(config.num_channels), size, size)
    dynamic = {"pixel_values": {0: torch.export.Dim(BATCH)}}
    inputs, outputs = ["pixel_values"], ["last_hidden_state"]
    onnx_model = _run_exporter(_vision_wrapper(loaded.model), (pixel_values,), inputs, outputs, dynamic,
                               _weight_files(loaded, from_files))
    return ExportedGraph(onnx_model, inputs, outputs, [])


def export_vlm(loaded: LoadedModel, from_files: bool = False) -> dict[str, ExportedGraph]:
    """The three graphs of a VLM bundle by role (:mod:`qsvd_export.models.vlm`): ``vision``
    (pixel_values → image_features), ``embed`` (input_ids → inputs_embeds) and ``model`` (the decoder)."""
    import torch

    from qsvd_export.models.vlm import vlm_parts

    parts = vlm_parts(loaded.model)
    files = _weight_files(loaded, from_files)
    channels = int(parts.vision_config.num_channels)
    pixel_values = torch.randn(2, channels, parts.image_size, parts.image_size)
    vision = _run_exporter(parts.vision, (pixel_values,), ["pixel_values"], ["image_features"],
                           {"pixel_values": {0: torch.export.Dim("frames")}}, files)
    ids = torch.randint(0, int(parts.text_config.vocab_size), (2, 3))
    embed = _run_exporter(parts.embed, (ids,), ["input_ids"], ["inputs_embeds"],
                          {"input_ids": {0: torch.export.Dim(BATCH), 1: torch.export.Dim(SEQ)}}, files)
    decoder = export_causal_lm(parts.decoder, files, embeds=True)
    return {
        "vision": ExportedGraph(vision, ["pixel_values"], ["image_features"], []),
        "embed": ExportedGraph(embed, ["input_ids"], ["inputs_embeds"], []),
        "model": decoder,
    }


def _weight_files(loaded: LoadedModel, from_files: bool) -> tuple[Any, Path] | None:
    return (loaded.model, loaded.weights_dir) if from_files and loaded.weights_dir is not None else None


def export_graph(loaded: LoadedModel, from_files: bool = False) -> ExportedGraph:
    """Export ``loaded`` to an in-memory ONNX IR model according to its kind (VLMs: :func:`export_vlm`).

    ``from_files``: the weights are unchanged since ``loaded`` was read from its safetensors folder, so the
    graph reads them from there (:func:`read_weights_from_files`) and the torch model may be released
    before the graph is written."""
    exporters = {"decoder": export_decoder, "encoder": export_encoder, "vision": export_vision}
    if loaded.kind not in exporters:
        raise UnsupportedModelError(f"{loaded.name}: no single-graph exporter for kind '{loaded.kind}'")
    return exporters[loaded.kind](loaded, from_files)

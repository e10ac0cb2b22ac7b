"""Graphs this project did not export: the folders exporters write, and what the graph itself says.

An exporter folder (optimum's ``main_export``, onnxruntime-genai's model builder, a hand-made HF
folder) holds ``config.json`` (or genai's ``genai_config.json``) and tokenizer files beside the graph,
and no ``qsvd_config.json``. :func:`model_folder` reads such a folder (or the one ``--tokenizer DIR``
names). :func:`attention_geometry` gives every attention block's head counts from the graph's own
head-split Reshapes; :func:`resolve_geometry` checks a config against them (a contradiction is a
:class:`UsageError` naming both) or, with no config, uses the graph's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.errors import UsageError

CONFIG_FILES = ("config.json", "genai_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass
class ModelFolder:
    """A model folder beside (or named for) a graph: its settings and whether it holds a tokenizer.

    ``config``: HF-style keys (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``hidden_size``, ``vocab_size``, ``model_type``, …); empty when the folder has no config file."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None
    tokenizer: bool = False

    def describe(self) -> str:
        return f"{self.path / self.config_file}" if self.config_file else str(self.path)


def _genai_config(data: dict[str, Any]) -> dict[str, Any]:
    """HF-style keys from onnxruntime-genai's ``genai_config.json`` (``model.decoder``)."""
    model = data.get("model", {}) if isinstance(data.get("model"), dict) else {}
    decoder = model.get("decoder", {}) if isinstance(model.get("decoder"), dict) else {}
    mapped = {"model_type": model.get("type"), "vocab_size": model.get("vocab_size"),
              "max_position_embeddings": model.get("context_length"),
              "bos_token_id": model.get("bos_token_id"), "eos_token_id": model.get("eos_token_id"),
              "pad_token_id": model.get("pad_token_id"),
              "num_attention_heads": decoder.get("num_attention_heads"),
              "num_key_value_heads": decoder.get("num_key_value_heads"), "head_dim": decoder.get("head_size"),
              "hidden_size": decoder.get("hidden_size"), "num_hidden_layers": decoder.get("num_hidden_layers")}
    return {k: v for k, v in mapped.items() if v is not None}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable JSON config ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    if path.name == "genai_config.json":
        return _genai_config(data)
    if "num_attention_heads" not in data and isinstance(data.get("text_config"), dict):  # a VLM: its LM
        data = {**data["text_config"], "model_type": data["text_config"].get("model_type", data.get("model_type"))}
    return data


def model_folder(folder: Path) -> ModelFolder:
    """The settings and tokenizer presence of ``folder`` (config.json before genai_config.json)."""
    folder = Path(folder)
    result = ModelFolder(folder, tokenizer=any((folder / name).is_file() for name in TOKENIZER_FILES))
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            result.config, result.config_file = _read_config(folder / name), name
            break
    return result


def exporter_folder(graph_path: Path) -> ModelFolder | None:
    """The folder beside ``graph_path`` if an exporter wrote settings or a tokenizer there, else None."""
    folder = model_folder(Path(graph_path).resolve().parent)
    return folder if folder.config_file or folder.tokenizer else None


def load_tokenizer(folder: ModelFolder) -> Any:
    """The folder's tokenizer (``AutoTokenizer``, no remote code); any failure is one :class:`UsageError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder.path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds (OSError, ValueError, validation errors)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UsageError(f"{folder.path}: its tokenizer cannot be loaded ({exc.__class__.__name__}: {first})") from None


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int

    def as_config(self) -> dict[str, int]:
        return {"num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim}


def _head_split(start: Any, stop: Any, width: int) -> tuple[int, int] | None:
    """(heads, head_dim) of the first Reshape on the data path from ``start`` (a projection output) to
    ``stop`` that splits the last axis ``width`` into [.., heads, head_dim]."""
    from qsvd_export.passes._graph import const_array, path_nodes, topo_order

    nodes = path_nodes(start, stop) or []
    data = {id(start)}
    graph = nodes[0].graph if nodes else None
    for node in topo_order(nodes, graph) if graph is not None else []:
        if not any(v is not None and id(v) in data for v in node.inputs[:1]):
            continue
        data.update(id(o) for o in node.outputs)
        if node.op_type != "Reshape":
            continue
        dims: list[int | None] = []
        shape = node.outputs[0].shape
        if shape is not None and shape.rank() >= 2:
            dims = [d if isinstance(d, int) else None for d in list(shape)[-2:]]
        target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if (not dims or None in dims) and target is not None and target.ndim == 1 and len(target) >= 3:
            dims = [int(d) if int(d) > 0 else None for d in target[-2:]]
        if len(dims) != 2:
            return None
        heads, head_dim = dims
        if head_dim and not heads and width % head_dim == 0:
            heads = width // head_dim
        if heads and not head_dim and width % heads == 0:
            head_dim = width // heads
        if heads and head_dim and heads * head_dim == width:
            return int(heads), int(head_dim)
        return None
    return None


def block_geometry(block: Any) -> Geometry | None:
    """Head counts of one attention block from the Reshapes that split Q and K into heads (None if unclear)."""
    q = _head_split(block.q.output, block.scores.inputs[0], block.dims["q"])
    k = _head_split(block.k.output, block.scores.inputs[1], block.dims["k"])
    if q is None or k is None or q[1] != k[1]:
        return None
    return Geometry(q[0], k[0], q[1])


def attention_geometry(blocks: list[Any]) -> list[Geometry | None]:
    return [block_geometry(block) for block in blocks]


def config_geometry(config: dict[str, Any], width_q: int, origin: str = "the model config") -> Geometry | None:
    """The head counts ``config`` claims (None if it has none). Sizes that do not divide are a UsageError."""
    heads = config.get("num_attention_heads")
    if heads is None:
        return None
    try:
        heads = int(heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or 0) or (width_q // heads if heads else 0)
    except (TypeError, ValueError):
        raise UsageError(f"{origin}: head counts are not integers ({heads!r})") from None
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise UsageError(f"{origin} contradicts the graph: its {heads} heads / {kv_heads} kv heads are not a positive "
                         f"multiple (the graph's Q projection is {width_q} wide)")
    return Geometry(heads, kv_heads, head_dim)


def resolve_geometry(config: dict[str, Any], blocks: list[Any], origin: str) -> list[Geometry]:
    """Per block, the head counts: the config's (``origin`` names it in errors) checked against the graph's
    head-split Reshapes, or with no head counts in ``config`` the graph's own. A contradiction, sizes that
    do not divide, or a graph that does not say and no config: :class:`UsageError`."""
    found = attention_geometry(blocks)
    result = []
    for block, graph in zip(blocks, found):
        dims = block.dims
        claimed = config_geometry(config, dims["q"], origin)
        if claimed is not None:
            if claimed.heads * claimed.head_dim != dims["q"] or claimed.kv_heads * claimed.head_dim != dims["k"]:
                seen = f"; its reshapes split Q into {graph.heads} heads and K into {graph.kv_heads} of {graph.head_dim}" \
                    if graph is not None else ""
                raise UsageError(f"{origin} contradicts the graph: {claimed.heads} heads / {claimed.kv_heads} kv heads "
                                 f"of {claimed.head_dim} do not fit attention block {block.index}'s projections "
                                 f"(Q {dims['q']}, K {dims['k']} wide){seen}")
            if graph is not None and graph != claimed:
                raise UsageError(f"{origin} contradicts the graph: it says {claimed.heads} heads / {claimed.kv_heads} "
                                 f"kv heads of {claimed.head_dim}, attention block {block.index}'s reshapes split Q "
                                 f"into {graph.heads} heads and K into {graph.kv_heads} of {graph.head_dim}")
            result.append(claimed)
        elif graph is not None:
            result.append(graph)
        else:
            raise UsageError(f"attention block {block.index}: the graph's reshapes do not show its head counts; "
                             "give --tokenizer DIR (the model's folder with config.json)")
    return result


def geometry_config(blocks: list[Any], geometry: list[Geometry], model: Any = None) -> dict[str, Any]:
    """Bundle ``model_config`` entries the graph shows: head counts (block 0), hidden size, layers, vocab."""
    if not blocks:
        return {}
    summary: dict[str, Any] = {**geometry[0].as_config(), "hidden_size": int(blocks[0].dims["e"]),
                               "num_hidden_layers": len(blocks)}
    if model is not None:
        logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
        if logits is not None and logits.shape is not None and isinstance(logits.shape[-1], int):
            summary["vocab_size"] = int(logits.shape[-1])
    return summary


def vocab_ok(windows: np.ndarray, vocab: int | None) -> None:
    """Token windows must index the graph's embedding table."""
    if vocab and windows.size and int(windows.max()) >= vocab:
        raise UsageError(f"the tokenizer gives token id {int(windows.max())}, beyond the graph's vocabulary of {vocab}: "
                         "it is not this model's tokenizer")

"""Bundle folder: graph(s) + external data + tokenizer files + ``qsvd_config.json``; written atomically.

``qsvd_config.json`` (modelled on onnxruntime-genai's ``genai_config.json``) is the runtime contract:
graph files with their input/output names, and the cache layout — one :class:`LayerCache` per decoder
layer, each listing its cache tensors (input name, output name, shape template with the symbolic dims
``batch_size`` and ``past_sequence_length``, dtype, the axis that grows with the sequence).
A dense layer has ``key`` and ``value`` tensors; a latent layer one ``latent`` tensor of width ``rank``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qsvd_export.errors import BadInputError, UsageError, raise_if_terminated

CONFIG_NAME = "qsvd_config.json"
GRAPH_FILE = "model.onnx"  # the graph of a one-graph bundle (npu: replaced by GRAPH_FILES)
FORMAT = "qsvd-export-bundle"
FORMAT_VERSION = 1
DTYPE_BYTES = {"float32": 4, "float16": 2, "uint16": 2, "int16": 2, "uint8": 1, "int8": 1}


@dataclass
class CacheTensor:
    input: str
    output: str
    shape: list[str | int]
    dtype: str
    sequence_axis: int
    # integer codes of a float cache: npu {"scale", "zero_point"}, value = (code - zero_point) * scale;
    # cpu latent {"axis", "scale": [r], "zero_point"}, one scale per channel along ``axis``
    quantization: dict[str, Any] | None = None
    # a tensor that stops growing at this length (the 4-bit latent's exact first token: 1); None = grows per token
    max_length: int | None = None

    def bytes_per_position(self) -> int:
        """Bytes of one position on the sequence axis for batch 1."""
        width = 1
        for axis, dim in enumerate(self.shape):
            if axis != self.sequence_axis and isinstance(dim, int):
                width *= dim
        return width * DTYPE_BYTES[self.dtype]

    def bytes_per_token(self) -> int:
        """Bytes one token adds to this tensor for batch 1 (0 for a tensor of bounded length)."""
        return 0 if self.max_length is not None else self.bytes_per_position()


@dataclass
class LayerCache:
    layer: int
    kind: str  # "dense" | "latent"
    tensors: list[CacheTensor]
    rank: int | None = None

    def bytes_per_token(self) -> int:
        return sum(t.bytes_per_token() for t in self.tensors)


@dataclass
class GraphSpec:
    role: str  # "model" (dynamic shapes) | "prefill" | "decode"
    filename: str
    inputs: list[str]
    outputs: list[str]
    ort_filename: str | None = None  # --mobile: the same graph in ORT format (qsvd_export/targets/mobile.py)


@dataclass
class BundleConfig:
    model_name: str
    model_type: str
    kind: str  # "decoder" | "encoder" | "vision"
    graphs: list[GraphSpec]
    cache: list[LayerCache] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    # npu bundles: {"context_length": T, "prefill_length": S, "cache": "right-aligned"} (runtimes/static_decode.py)
    static_shapes: dict[str, Any] = field(default_factory=dict)
    # dynamic decoder / VLM bundles whose attention is not fused: the most prompt tokens a runtime should feed per
    # forward (one forward holds [batch, heads, S, past + S] scores per layer); None: the whole prompt at once
    prefill_chunk: int | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def graph(self, role: str = "model") -> GraphSpec:
        for spec in self.graphs:
            if spec.role == role:
                return spec
        raise BadInputError(f"bundle has no '{role}' graph (has: {', '.join(g.role for g in self.graphs)})")

    def kv_bytes_per_token(self) -> int:
        return sum(layer.bytes_per_token() for layer in self.cache)

    def kv_fixed_bytes(self) -> int:
        """Cache bytes that do not grow with the sequence (bounded tensors at their full length), batch 1."""
        return sum(t.bytes_per_position() * t.max_length for layer in self.cache for t in layer.tensors
                   if t.max_length is not None)

    def to_json(self) -> str:
        data = asdict(self)
        if data["prefill_chunk"] is None:
            del data["prefill_chunk"]
        for graph in data["graphs"]:  # optional fields are written only when set (older configs stay byte-identical)
            if graph["ort_filename"] is None:
                del graph["ort_filename"]
        for tensor in (t for layer in data["cache"] for t in layer["tensors"]):
            for optional in ("quantization", "max_length"):
                if tensor[optional] is None:
                    del tensor[optional]
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleConfig":
        if data.get("format") != FORMAT:
            raise BadInputError(f"not a qsvd-export bundle config (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise BadInputError(f"bundle format_version {data.get('format_version')} is not {FORMAT_VERSION}")
        data = dict(data)
        data["graphs"] = [GraphSpec(**g) for g in data["graphs"]]
        data["cache"] = [
            LayerCache(**{**layer, "tensors": [CacheTensor(**t) for t in layer["tensors"]]})
            for layer in data.get("cache", [])
        ]
        return cls(**data)


def load_bundle_config(bundle: Path) -> BundleConfig:
    path = Path(bundle) / CONFIG_NAME
    if not Path(bundle).is_dir():
        raise BadInputError(f"{bundle}: bundle folder not found")
    if not path.is_file():
        raise BadInputError(f"{bundle}: not a bundle (no {CONFIG_NAME})")
    try:
        return BundleConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise BadInputError(f"{path}: malformed bundle config ({exc.__class__.__name__}: {exc})") from None


def bundle_tokenizer(bundle: Path) -> Any:
    """The tokenizer saved in a bundle (tiny test bundles: UTF-8 bytes)."""
    config = load_bundle_config(bundle)
    if not config.tokenizer_files and config.model_name.startswith("tiny-"):
        from qsvd_export.tiny import ByteTokenizer

        return ByteTokenizer()  # tiny test models read UTF-8 bytes
    if not config.tokenizer_files:
        raise UsageError(f"{bundle}: bundle has no tokenizer files")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle, trust_remote_code=False)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists and is non-empty (unless ``overwrite``) or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder {out} is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write output {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write output {out}: {existing} is not writable")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out``, on any failure it is removed.

    Interrupts (KeyboardInterrupt, SIGTERM turned into an exception by the CLI) take the failure path,
    so no partial output and no temporary folder is left behind.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        raise_if_terminated()  # a SIGTERM that library code swallowed still leaves nothing behind
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")

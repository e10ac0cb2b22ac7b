"""Typed Python API: ``export_model``, ``compress_model``, ``compile_graph`` and ``load_bundle``.

(Not ``export`` / ``compress``: those names are the subpackages ``qsvd_export.export`` and
``qsvd_export.compress``, which would replace the functions on the package once imported.)

Options are frozen dataclasses whose fields are the CLI's flags (``--calib-windows`` is ``calib_windows``).
They validate themselves on construction through the CLI's own parser and checks (``cli.parser.build_parser``,
``cli.requests.export_request`` / ``compress_request`` / ``compile_request``), so a bad option raises the same
:class:`~qsvd_export.errors.UsageError` message, with the same exit class, as the command line would print.

    from qsvd_export import ExportOptions, export_model, load_bundle

    result = export_model("smollm2-135m", "out/w4a8", ExportOptions(target="cpu", bits="w4a8"))
    bundle = load_bundle(result.out)
    for piece in bundle.stream("What is the capital of France?", max_new_tokens=32):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Literal

from qsvd_export.bundle import BundleConfig, bundle_tokenizer, load_bundle_config
from qsvd_export.compress.options import Allocation, Grouping, Importance, LatentRotation, Whitening
from qsvd_export.errors import UsageError

Target = Literal["cpu", "gpu", "npu"]
Preset = Literal["fp", "w8a16", "w8a8", "w4a16", "w4a8", "w4a4"]
CalibrationMethod = Literal["minmax", "percentile", "mse"]
_NEGATED = {"verify": "--no-verify"}  # flags whose CLI form is the negation


@dataclass(frozen=True, kw_only=True)
class _Flags:
    """Fields map one to one onto CLI flags; construction parses them with the CLI's parser and checks."""

    def argv(self) -> list[str]:
        """The CLI flags these options stand for (fields left at their default give none)."""
        out: list[str] = []
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.default is not MISSING and value == f.default:
                continue
            if f.name in _NEGATED:
                out += [] if value else [_NEGATED[f.name]]
            elif value is None or value is False:
                continue
            elif value is True:
                out.append(flag)
            else:
                out += [flag, str(value)]
        return out

    def namespace(self, command: str, *positional: str | Path) -> argparse.Namespace:
        """The parsed CLI arguments of ``command`` with these options (UsageError as the CLI raises it)."""
        from qsvd_export.cli import build_parser

        return build_parser().parse_args([command, *map(str, positional), *self.argv()])


@dataclass(frozen=True, kw_only=True)
class _TargetFlags(_Flags):
    """The target stage (``--target``, ``--bits``, ``--strict``, ``--mobile``) and the npu group."""

    target: Target | None = None
    strict: bool = False
    mobile: bool = False
    context_length: int = 1024
    prefill_length: int = 128
    htp_arch: str = "73"
    calibration_method: CalibrationMethod = "mse"
    int4_block: int = 32
    precompile: bool = False
    verify: bool = True
    kv_bits: Literal[4, 8, 16, 32] | None = None  # cpu: 4 | 8 | 32 fused attention, 4 | 8 | 32 latent; npu: 8 | 16 | 32
    latent_groups: int | None = None


@dataclass(frozen=True, kw_only=True)
class ExportOptions(_TargetFlags):
    """``qsvd-export export``: a dense bundle, fp32 or quantized for ``target``."""

    bits: Preset | None = None
    seed: int = 0
    rotate: bool = False
    rotate_mlp: bool = False
    rotate_o_proj: bool = False
    smooth: bool | None = None
    smooth_calib: Literal["auto", "wiki", "chat", "mixed"] = "auto"
    overwrite: bool = False

    def argv(self) -> list[str]:
        out = [a for a in super().argv() if a != "--smooth"]
        return out + ([] if self.smooth is None else ["--smooth" if self.smooth else "--no-smooth"])

    def __post_init__(self) -> None:
        from qsvd_export.cli.requests import export_request

        export_request(self.namespace("export", "MODEL", "-o", "OUT"))


@dataclass(frozen=True, kw_only=True)
class CompressionOptions(_TargetFlags):
    """``qsvd-export compress``: the QSVD torch stage under ``budget`` (e.g. ``"kv=0.5"``), then the graph and
    target stages. ``bits`` is the preset β is searched for (and, with ``target``, the graph's preset)."""

    budget: str
    bits: Preset | None = None
    allocation: Allocation = "qsvd"
    grouping: Grouping = "auto"
    whitening: Whitening = "fisher"
    calib: str = "wiki_calib"
    calib_images: str | None = None
    calib_windows: int | None = None
    calib_length: int | None = None
    grad_windows: int | None = None
    importance: Importance = "gradient"
    beta: float | None = None
    rotation: LatentRotation = "orthogonal"
    kv_form: Literal["rebuild", "absorbed"] = "rebuild"
    rotate: bool = False
    rotate_mlp: bool = False
    rotate_o_proj: bool = False
    min_rank: int = 8
    rank_multiple: int = 1
    seed: int = 0
    device: str = "cpu"
    device_map: str | None = None
    eval: bool = False
    eval_text: str = "wiki_eval"
    eval_windows: int = 32
    dump_passes: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from qsvd_export.cli.requests import compress_request

        compress_request(self.namespace("compress", "MODEL", "-o", "OUT"))


@dataclass(frozen=True, kw_only=True)
class CompileOptions(_TargetFlags):
    """``qsvd-export GRAPH.onnx``: the graph stage on any ONNX transformer, with a ``plan`` folder or a plan
    built from the graph itself under ``budget``, then the target stage."""

    bits: Preset | None = None
    plan: str | None = None
    budget: str | None = None
    calib: str = "wiki_calib"
    calib_windows: int | None = None
    calib_length: int | None = None
    calib_npz: str | None = None
    calib_images: str | None = None
    tokenizer: str | None = None
    grad_windows: int | None = None
    allocation: Literal["qsvd", "uniform"] = "qsvd"
    seed: int = 0
    dump_passes: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from qsvd_export.cli.requests import compile_request

        compile_request(self.namespace("compile", "GRAPH.onnx", "-o", "OUT"))


def export_model(model: str, output: str | Path, options: ExportOptions | None = None) -> Any:
    """Export ``model`` (zoo name, ``tiny-<family>`` or HF folder) to a bundle in ``output``; returns the
    :class:`~qsvd_export.build.files.BuildResult` (``out``, ``config``, ``report``, ``timings``)."""
    from qsvd_export.cli.requests import export_request
    from qsvd_export.build.dense import build_dense_bundle

    options = options or ExportOptions()
    return build_dense_bundle(**export_request(options.namespace("export", model, "-o", output)))


def compress_model(model: str, output: str | Path, options: CompressionOptions) -> Any:
    """QSVD-compress ``model`` into a latent-cache bundle in ``output``; returns the BuildResult."""
    from qsvd_export.cli.requests import compress_request
    from qsvd_export.compress.placement import check_placement
    from qsvd_export.build.compressed import build_compressed_bundle

    request = compress_request(options.namespace("compress", model, "-o", output))
    check_placement(options.device, options.device_map)
    return build_compressed_bundle(**request)


def compile_graph(graph: str | Path, output: str | Path, options: CompileOptions | None = None) -> Any:
    """The graph stage (and target stage) on an ONNX file; returns the BuildResult."""
    from qsvd_export.cli.requests import compile_request
    from qsvd_export.build.from_graph import compile_onnx

    options = options or CompileOptions()
    return compile_onnx(**compile_request(options.namespace("compile", graph, "-o", output)))


@dataclass
class Bundle:
    """A decoder bundle opened for generation (dynamic ``model`` graph or static npu prefill/decode pair)."""

    path: Path
    config: BundleConfig
    runner: Any
    tokenizer: Any

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of ``prompt``, through the chat template when the model has one and ``chat``."""
        from qsvd_export.cli.commands import encode_prompt

        return encode_prompt(self.tokenizer, prompt, chat=bool(self.config.generation.get("chat_template")) and chat)

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> Iterator[int]:
        """Greedy new token ids, yielded as they are generated (stops after an EOS id)."""
        if max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        eos = self.config.generation.get("eos_token_ids")
        if hasattr(self.runner, "stream"):
            yield from self.runner.stream(prompt_ids, max_new_tokens, eos)
        else:  # static npu runner: generated whole, then yielded
            yield from self.runner.generate(prompt_ids, max_new_tokens, eos)

    def stream(self, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> Iterator[str]:
        """Decoded text pieces as tokens are generated; joined they equal :meth:`generate`'s text."""
        ids: list[int] = []
        shown = ""
        for token in self.stream_ids(self.encode(prompt, chat), max_new_tokens):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                continue
            if len(text) > len(shown):  # an EOS (skipped special token) adds no text
                yield text[len(shown):]
            shown = text
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
        """The greedy answer to ``prompt`` (the text ``qsvd-export run`` prints)."""
        return self.tokenizer.decode(list(self.stream_ids(self.encode(prompt, chat), max_new_tokens)),
                                     skip_special_tokens=True)


def load_bundle(path: str | Path, target: Target = "cpu", threads: int | None = None) -> Bundle:
    """Open a decoder bundle for generation on ``target``'s execution provider."""
    from qsvd_export.runtimes.sessions import SessionOptions

    from qsvd_export.cli import build_parser

    build_parser().parse_args(["run", str(path), "--prompt", "", "--target", str(target)]
                              + ([] if threads is None else ["--threads", str(threads)]))  # the CLI's errors
    path = Path(path)
    config = load_bundle_config(path)
    if config.kind != "decoder":
        raise UsageError(f"{path}: a {config.kind} bundle has no text generation (load_bundle takes decoder bundles)")
    options = SessionOptions(threads=threads)
    if config.static_shapes:
        from qsvd_export.runtimes.static_decode import StaticDecoder

        runner: Any = StaticDecoder.from_bundle(path, target, options)
    else:
        from qsvd_export.runtimes.decode import DecoderRunner

        runner = DecoderRunner(path, target, options)
    return Bundle(path, config, runner, bundle_tokenizer(path))

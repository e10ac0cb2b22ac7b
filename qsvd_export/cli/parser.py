"""The argument parser: subcommands and their options; ``--target`` choices come from the target registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from qsvd_export.errors import UsageError
from qsvd_export.targets import TARGETS
from qsvd_export.targets.npu.options import HTP_ARCH
from qsvd_export.version import __version__

PROG = "qsvd-export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("--log-json", action="store_true",
                        help="progress, status and the final summary as JSON lines on stderr (no bars)")


def _presets_help() -> str:
    """Each target's presets, its default first (read from the registry)."""
    return "; ".join(f"{name} {policy.default_bits} (default), "
                     + ", ".join(b for b in policy.allowed_bits if b != policy.default_bits)
                     for name, policy in TARGETS.items())


def _add_target(parser: argparse.ArgumentParser, bits: bool = True) -> None:
    """--target/--bits/--strict: the target stage (``bits=False`` where the command has its own --bits)."""
    parser.add_argument("--target", choices=list(TARGETS), default=None,
                        help="quantize the graph for this execution provider (default: keep fp32): "
                             + "; ".join(f"{name}: {policy.description}" for name, policy in TARGETS.items()))
    if bits:
        parser.add_argument("--bits", default=None, help="bit-width preset for --target: " + _presets_help())
    parser.add_argument("--strict", action="store_true", help="fail if the target check finds violations")
    parser.add_argument("--kv-bits", type=int, choices=[4, 8, 16, 32], default=None,
                        help="cpu target: KV cache element bits of fused attention: 8 = int8, 4 = int4 (packed), with static per-channel "
                             "scales (default with a KV budget), 32 = float (default without); a QSVD latent cache "
                             "(rebuild form, or a latent graph): 8 = 8-bit codes with static per-channel scales "
                             "(default), 4 = 4-bit codes, two per byte, 32 = float; npu target: the static "
                             "graphs' cache I/O, 8 / 16 = uint8 / uint16 codes with one static scale per cache tensor "
                             "(default 8), 32 = float")
    parser.add_argument("--latent-groups", type=int, default=None,
                        help="cpu target with a KV budget: latent groups per layer (default: one per KV head, "
                             "dense attention's multiply-adds per cached byte)")
    parser.add_argument("--mobile", action="store_true",
                        help="also write every graph in ORT format (.ort, weights embedded) and required_operators.config "
                             "for a reduced onnxruntime build, checked against the ONNX graphs on the CPU EP")
    npu = parser.add_argument_group("npu target (static graphs for QNN HTP)")
    npu.add_argument("--context-length", type=int, default=1024, help="cache slots of the static graphs (default 1024)")
    npu.add_argument("--prefill-length", type=int, default=128, help="tokens per prefill call (default 128)")
    npu.add_argument("--htp-arch", default=HTP_ARCH, help=f"QNN HTP architecture to compile for (default {HTP_ARCH})")
    npu.add_argument("--calibration-method", default="mse", choices=["minmax", "percentile", "mse"],
                     help="ranges of the 8-bit activations (w8a8): mse clipping (default, measured best), "
                          "minmax, or percentile")
    npu.add_argument("--int4-block", type=int, default=32,
                     help="w4a16: int4 weights in LPBQ blocks of this many input channels (4-bit block scales "
                          "x a float channel scale, the form HTP runs); 0 = one scale per output channel (default 32)")
    npu.add_argument("--precompile", action="store_true",
                     help="also write QNN HTP context binaries (prefill_ctx.onnx / decode_ctx.onnx + .bin)")
    npu.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip the QNN HTP compile and greedy check (default: run it when onnxruntime-qnn is installed)")


def _add_rotation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rotate", action="store_true",
                        help="H1: fold norm gains and rotate the residual stream (QuaRot) before export")
    parser.add_argument("--rotate-mlp", action="store_true",
                        help="with --rotate: also rotate each down_proj input online (for 8-bit activations)")
    parser.add_argument("--rotate-o-proj", action="store_true",
                        help="with --rotate: also rotate each o_proj input online, across and within heads")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", choices=["cpu", "gpu", "npu"], help="execution provider")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores, max 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="QSVD export compiler: transformers → compressed ONNX bundles")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("export", help="dense fp32 ONNX bundle of a model (zoo name, tiny-<family> or HF folder)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed for tiny random models and the rotation")
    _add_rotation(p)
    _add_target(p)
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="activation-aware weight scaling for --target's weight bits (16 x 512 calibration tokens); "
                        "default with --target cpu and no --bits: on, with w4a8, for llama-family models")
    p.add_argument("--smooth-calib", choices=["auto", "wiki", "chat", "mixed"], default="auto",
                   help="smoothing calibration text: the model's own chat-formatted replies to the project's calibration "
                        "prompts (chat), wiki_calib (wiki) or half of each (mixed); auto (default): chat for models "
                        "with a chat template, else wiki")
    _add_common(p)

    p = sub.add_parser("run", help="greedy generation from a decoder or vision-language bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, default=None, help="vision-language bundles: the image the prompt is about")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_runtime(p)
    _add_common(p)

    p = sub.add_parser("eval", help="perplexity of a decoder bundle on a text (EVAL.md protocol)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--ppl", required=True, help="text file or bundled corpus (wiki_eval, news_eval)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-len", type=int, default=512)
    _add_runtime(p)
    _add_common(p)

    p = sub.add_parser("demo", help="the bundled default model end to end, with a summary")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-o", "--output", type=Path, default=Path("qsvd-demo"))
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens (EVAL.md: 32)")
    p.add_argument("--budget", default="kv=0.5,params=1.0")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (compress default: 128)")
    p.add_argument("--grad-windows", type=int, default=8, help="gradient windows (compress default: 32)")
    p.add_argument("--prompt", default="What is the capital of France?")
    _add_runtime(p)
    _add_common(p)

    p = sub.add_parser("compress", help="QSVD torch stage: calibrate, allocate ranks under a budget, write a plan")
    p.add_argument("model")
    p.add_argument("--budget", required=True, help="kv=R2 and/or params=R1, e.g. kv=0.5 or params=0.8,kv=0.75")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--allocation", choices=["qsvd", "uniform", "fisher"], default="qsvd")
    p.add_argument("--grouping", choices=["auto", "qkv", "kv", "separate"], default="auto")
    p.add_argument("--kv-form", choices=["rebuild", "absorbed"], default="rebuild",
                   help="how a latent cache is read: rebuild = QSVD's joint pre-RoPE latent, keys rebuilt from it "
                        "every step (default: best quality, measured on the dev split); absorbed = post-RoPE key "
                        "and value latents read directly by GroupQueryAttention (--target cpu, plain causal "
                        "models, KV-only budgets; docs/decisions.md)")
    p.add_argument("--whitening", choices=["fisher", "absmean", "cholesky", "none"], default="fisher",
                   help="fisher: input absmean (decoders) or Cholesky (encoders) + output-gradient Fisher "
                        "(default); absmean: ASVD; cholesky: SVD-LLM")
    p.add_argument("--calib", default="wiki_calib", help="calibration text file or bundled corpus")
    p.add_argument("--calib-images", type=Path, default=None,
                   help="vision-language models: a folder of calibration images (default: scikit-image's samples)")
    p.add_argument("--calib-windows", type=int, default=None, help="default: 128 (decoders), 256 (encoders), 64 (VLMs)")
    p.add_argument("--calib-length", type=int, default=None, help="tokens per window; default: 512 (decoders), 32 (encoders)")
    p.add_argument("--grad-windows", type=int, default=None,
                   help="windows for the gradient passes; default: 32 (decoders), 128 (encoders)")
    p.add_argument("--importance", choices=["gradient", "kfac"], default="gradient",
                   help="gradient: the paper's (σ·uᵀGS⁻ᵀv)² (one more backward pass); kfac: from the Fisher statistics")
    p.add_argument("--bits", default=None,
                   help="fp, w8a16, w8a8, w4a16, w4a8, w4a4: β is searched for them; with --target also the graph's preset")
    p.add_argument("--beta", type=float, default=None, help="fixed β instead of the per-group search")
    p.add_argument("--rotation", choices=["orthogonal", "hadamard", "none"], default="orthogonal",
                   help="H2 on the latent")
    _add_rotation(p)
    _add_target(p, bits=False)
    p.add_argument("--min-rank", type=int, default=8)
    p.add_argument("--rank-multiple", type=int, default=1,
                   help="round each cached latent rank to a multiple (2: no padding channel in 4-bit or genai caches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the torch stage runs: cpu (default), cuda or cuda:N (calibration, gradients, SVDs; "
                        "export stays on the CPU)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="split the torch stage over GPUs with accelerate: auto, balanced, balanced_low_0, sequential, "
                        "or a JSON file of module name -> device (every module on a GPU; without GPUs the "
                        "strategies mean the CPU)")
    p.add_argument("--eval", action="store_true", help="perplexity of dense and compressed model in torch")
    p.add_argument("--eval-text", default="wiki_eval")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--dump-passes", type=Path, default=None, help="save the graph after every pass here")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)

    p = sub.add_parser("compile", help="graph stage on an ONNX file (also: qsvd-export model.onnx ...)")
    p.add_argument("graph", type=Path)
    p.add_argument("--plan", type=Path, help="CompressionPlan folder (plan.json + plan.safetensors)")
    p.add_argument("--budget", default=None,
                   help="build the plan from the graph itself (no torch model): kv=R2 and/or params=R1; statistics "
                        "from ONNX Runtime, gradients from the graph differentiated in torch")
    p.add_argument("--calib", default="wiki_calib", help="with --budget: calibration text file or bundled corpus")
    p.add_argument("--calib-windows", type=int, default=None, help="with --budget: default 128 (decoders), 256 (encoders)")
    p.add_argument("--calib-length", type=int, default=None, help="with --budget: default 512 (decoders), 32 (encoders)")
    p.add_argument("--calib-npz", type=Path, default=None,
                   help="with --budget: calibrate on these token windows instead of text (.npz with input_ids "
                        "[windows, tokens]; no tokenizer needed), or for a vision graph on pixel_values [n, C, H, W]")
    p.add_argument("--calib-images", type=Path, default=None,
                   help="with --budget on a vision graph: calibrate on the images in this folder (png, jpg, ...; "
                        "normalised by preprocessor_config.json beside the graph or in --tokenizer, else ImageNet's)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="for a graph without its bundle: the model's folder (tokenizer files, config.json); by "
                        "default the folder an exporter wrote beside the graph (optimum, onnxruntime-genai) is read. "
                        "Head counts it does not give come from the graph's reshapes")
    p.add_argument("--grad-windows", type=int, default=None,
                   help="with --budget: windows for the graph's gradient passes; default 32 (decoders), 128 "
                        "(encoders); 0: gradient-free (input whitening, spectrum-energy ranks)")
    p.add_argument("--allocation", choices=["qsvd", "uniform"], default="qsvd", help="with --budget")
    p.add_argument("--seed", type=int, default=0, help="with --budget: the latent rotation's seed")
    p.add_argument("-o", "--output", required=True, type=Path)
    _add_target(p)
    p.add_argument("--dump-passes", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)

    p = sub.add_parser("models", help="list the bundled models and tiny test families")
    _add_common(p)
    return parser


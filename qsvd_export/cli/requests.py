"""Parsed arguments → the keyword arguments of the build recipes, checked before any slow work. The typed
Python API (``qsvd_export.api``) validates its options through the same functions."""

from __future__ import annotations

import argparse
from typing import Any

from qsvd_export.errors import UsageError


def npu_options(args: argparse.Namespace) -> Any:
    """NpuOptions from the npu argument group (validated)."""
    from qsvd_export.targets.npu.options import NpuOptions

    if args.precompile and args.target != "npu":
        raise UsageError("--precompile needs --target npu")
    cache = {"cache_bits": args.kv_bits} if args.target == "npu" and args.kv_bits is not None else {}
    options = NpuOptions(prefill_length=args.prefill_length, context_length=args.context_length,
                         htp_arch=args.htp_arch, calibration_method=args.calibration_method,
                         int4_block=args.int4_block, precompile=args.precompile, **cache)
    options.check()
    return options


def kv_options(args: argparse.Namespace, budget: float | None = None) -> Any:
    """KvCacheOptions from --kv-bits/--latent-groups (and the KV budget), or None when the cache stays as is
    (and for target npu, whose --kv-bits sets the static graphs' cache I/O: :func:`npu_options`)."""
    from qsvd_export.build.kv_cache import KvCacheOptions

    if args.target == "npu" and args.latent_groups is None:
        return None
    bits = {4: 4, 8: 8, 32: None, None: 8 if budget is not None else None}[args.kv_bits]
    if args.latent_groups is not None and budget is None:
        raise UsageError("--latent-groups needs a KV budget (compress --budget kv=R2 --target cpu)")
    options = KvCacheOptions(budget=budget, bits=bits, groups=args.latent_groups,
                             calib_windows=getattr(args, "calib_windows", None) or 32)
    if not options.active:
        return None
    options.check(args.target)
    return options


def _latent_cache_bits(bits: int | None, target: str | None) -> int | str | None:
    """--kv-bits for a QSVD latent cache (rebuild form) on target cpu: 8 / 4 = 8- / 4-bit codes, 32 = float (None);
    not given: "auto" (8-bit where the graph caches a latent, chosen on the dev split: docs/decisions.md)."""
    if bits is None:
        return "auto" if target == "cpu" else None
    if target != "cpu":
        raise UsageError(f"--kv-bits {bits} needs --target cpu or npu (got {target or 'none'})")
    if bits not in (4, 8, 32):
        raise UsageError(f"--kv-bits {bits} is not available for a latent cache on target cpu (8, 4, or 32 for float)")
    return None if bits == 32 else bits


def target_request(args: argparse.Namespace, bits: str | None, kv: Any = None,
                   latent_cache_bits: int | str | None = None) -> Any:
    """The TargetRequest of the target flags (validated), or None without ``--target``."""
    npu = npu_options(args)  # refuses npu-only flags given without target npu
    if args.target is None:
        return None
    from qsvd_export.build.request import TargetRequest

    return TargetRequest(args.target, bits, strict=args.strict, npu=npu if args.target == "npu" else None,
                         verify=args.verify, kv=kv, latent_cache_bits=latent_cache_bits)


def session_options(args: argparse.Namespace) -> Any:
    from qsvd_export.runtimes.sessions import SessionOptions

    return SessionOptions(threads=args.threads)


def export_request(args: argparse.Namespace) -> dict[str, Any]:
    """``build_dense_bundle``'s keyword arguments from ``export``'s args, validated (shared with ``qsvd_export.api``)."""
    from qsvd_export.build.stages import check_rotation_options, check_target_options

    check_target_options(args.target, args.bits, args.smooth)
    check_rotation_options(args.rotate, args.rotate_mlp or args.rotate_o_proj, args.target, args.bits)
    if args.smooth_calib != "auto" and args.smooth is False:
        raise UsageError("--smooth-calib chooses the smoothing's calibration text; it does nothing with --no-smooth")
    return dict(spec=args.model, out=args.output, overwrite=args.overwrite, seed=args.seed,
                rotate=args.rotate, rotate_mlp=args.rotate_mlp, rotate_o_proj=args.rotate_o_proj,
                target=target_request(args, args.bits, kv=kv_options(args)), smooth=args.smooth,
                smooth_calib=args.smooth_calib, mobile=args.mobile)


def compress_request(args: argparse.Namespace) -> dict[str, Any]:
    """``build_compressed_bundle``'s keyword arguments from ``compress``'s args, validated (shared with
    ``qsvd_export.api``)."""
    from qsvd_export.build.stages import check_rotation_options, check_target_options
    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.options import CompressOptions
    from qsvd_export.quant.presets import parse_bits

    for flag in ("calib_windows", "calib_length", "grad_windows", "eval_windows", "min_rank", "rank_multiple"):
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
        min_rank=args.min_rank, rank_multiple=args.rank_multiple, seed=args.seed, device=args.device,
        device_map=args.device_map,
    )
    if args.kv_form == "absorbed" and (args.target != "cpu" or options.budget.params is not None):
        raise UsageError("--kv-form absorbed needs --target cpu and a KV-only budget (--budget kv=R2)")
    if args.kv_form != "absorbed" and args.latent_groups is not None:
        raise UsageError("--latent-groups sets the latent of fused attention: use it with --kv-form absorbed")
    latent_cache_bits = None
    if args.kv_form != "absorbed" and args.target != "npu":
        latent_cache_bits = _latent_cache_bits(args.kv_bits, args.target)
    target_bits = args.bits if args.target else None
    check_target_options(args.target, target_bits)
    check_rotation_options(args.rotate, args.rotate_mlp or args.rotate_o_proj, args.target, target_bits)
    return dict(spec=args.model, options=options, out=args.output, overwrite=args.overwrite,
                eval_text=args.eval_text if args.eval else None, eval_windows=args.eval_windows,
                dump_dir=args.dump_passes, mobile=args.mobile,
                target=target_request(args, target_bits, latent_cache_bits=latent_cache_bits,
                                      kv=kv_options(args, options.budget.kv) if args.kv_form == "absorbed" else None))


def compile_request(args: argparse.Namespace) -> dict[str, Any]:
    """``compile_onnx``'s keyword arguments from ``compile``'s args, validated (shared with ``qsvd_export.api``)."""
    from qsvd_export.build.stages import check_target_options

    if args.latent_groups is not None:
        raise UsageError("--latent-groups is not available on ONNX graphs (use compress --kv-form absorbed)")
    latent_cache_bits = None if args.target == "npu" else _latent_cache_bits(args.kv_bits, args.target)

    graph_only = None
    if args.budget is not None and args.plan is not None:
        raise UsageError("--budget builds a plan from the graph; it cannot be combined with --plan")
    if args.calib_npz is not None and args.budget is None:
        raise UsageError("--calib-npz calibrates a graph-only plan: give --budget too")
    if args.calib_images is not None and args.budget is None:
        raise UsageError("--calib-images is for graph-only plans: give --budget too")
    if args.budget is not None:
        from qsvd_export.compress.budget import parse_budget
        from qsvd_export.compress.options import CompressOptions

        for flag in ("calib_windows", "calib_length", "grad_windows"):
            least = 0 if flag == "grad_windows" else 2
            if getattr(args, flag) is not None and getattr(args, flag) < least:
                raise UsageError(f"--{flag.replace('_', '-')} is too small ({getattr(args, flag)})")
        graph_only = CompressOptions(parse_budget(args.budget), allocation=args.allocation, calib_text=args.calib,
                                     calib_windows=args.calib_windows, calib_length=args.calib_length,
                                     grad_windows=args.grad_windows, seed=args.seed)
    check_target_options(args.target, args.bits)
    return dict(graph_path=args.graph, plan_path=args.plan, out=args.output, overwrite=args.overwrite,
                dump_dir=args.dump_passes, target=target_request(args, args.bits, latent_cache_bits=latent_cache_bits),
                mobile=args.mobile, graph_only=graph_only, calib_npz=args.calib_npz, tokenizer_dir=args.tokenizer,
                calib_images=args.calib_images)


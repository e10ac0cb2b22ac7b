"""Options of the torch stage and of graph-only plans: typed (Literal fields), validated on construction, no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from qsvd_export.compress.budget import Budget
from qsvd_export.options import check_choices

Allocation = Literal["qsvd", "uniform", "fisher"]
Grouping = Literal["auto", "qkv", "kv", "separate"]
Whitening = Literal["fisher", "absmean", "cholesky", "none"]
Importance = Literal["gradient", "kfac"]  # gradient (paper) | kfac (from the Fisher whitening statistics)
LatentRotation = Literal["orthogonal", "hadamard", "none"]  # H2 on the latent

CALIBRATION_DEFAULTS = {"decoder": (128, 512, 32), "encoder": (256, 32, 128), "vision": (128, 0, 32),
                        "vlm": (64, 256, 16)}


def with_calibration_defaults(options: CompressOptions, kind: str) -> CompressOptions:
    """``options`` with unset calibration sizes filled in for a model of ``kind``."""
    windows, length, grads = CALIBRATION_DEFAULTS.get(kind, CALIBRATION_DEFAULTS["decoder"])
    return replace(options,
                   calib_windows=windows if options.calib_windows is None else options.calib_windows,
                   calib_length=length if options.calib_length is None else options.calib_length,
                   grad_windows=grads if options.grad_windows is None else options.grad_windows)


@dataclass
class CompressOptions:
    """Options of the torch stage (``compress``) and of graph-only plans; checked on construction
    (:func:`qsvd_export.options.check_choices`: every Literal field holds one of its values)."""

    budget: Budget
    allocation: Allocation = "qsvd"
    grouping: Grouping = "auto"
    whitening: Whitening = "fisher"
    alpha: float | None = None  # absmean exponent (default 1.0 with fisher, 0.5 with absmean, as in ASVD)
    fisher_gamma: float = 0.5  # output side: F^(γ/2)
    fisher_input: Literal["absmean", "cholesky"] | None = None  # input side of fisher whitening: absmean | cholesky (None: per model kind)
    calib_text: str = "wiki_calib"
    calib_images: str | None = None  # VLMs: a folder of calibration images (None: skimage.data samples)
    calib_windows: int | None = None  # None: CALIBRATION_DEFAULTS for the model kind
    calib_length: int | None = None
    grad_windows: int | None = None
    importance: Importance = "gradient"  # gradient (paper) | kfac (from the Fisher whitening statistics, no extra pass)
    bits: str = "fp"
    beta: float | None = None  # None: searched per group when bits are set, else 0.5
    rotation: LatentRotation = "orthogonal"  # H2 on the latent
    residual_rotation: bool = False  # H1: norms folded, residual stream rotated before calibration
    rotate_mlp: bool = False  # with residual_rotation: down_proj inputs rotated online (one MatMul per layer)
    rotate_o_proj: bool = False  # with residual_rotation: o_proj inputs rotated online (across and within heads)
    min_rank: int = 8
    rank_multiple: int = 1  # cached latent ranks rounded to a multiple (2: no padding channel in 4-bit / genai caches)
    seed: int = 0
    device: str = "cpu"  # where the torch stage runs (calibration, gradients, SVDs): cpu, cuda, cuda:N
    device_map: str | None = None  # or split over GPUs: an accelerate strategy (auto, balanced, ...) or a JSON file

    def __post_init__(self) -> None:
        check_choices(self)


def options_summary(options: CompressOptions) -> dict[str, Any]:
    data = asdict(options)
    data["budget"] = options.budget.describe()
    return data

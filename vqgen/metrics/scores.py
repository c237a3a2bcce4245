"""FID, KID, the Inception Score and precision/recall: torch-fidelity 0.4's own functions, at its defaults, on the
features vqgen extracted and gathered across ranks (torch-fidelity's `calculate_metrics` reads inputs itself, on
one process, so vqgen calls the functions behind it). What vqgen adds is a one-line error, naming the fix, when a
set is too small for a metric; torch-fidelity's own check is an assertion or a bare ValueError.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity import metric_fid, metric_isc, metric_kid, metric_prc
from torch_fidelity.defaults import DEFAULTS

from vqgen.cli import VqgenError

KID_SUBSET_SIZE, IS_SPLITS, PR_K = DEFAULTS["kid_subset_size"], DEFAULTS["isc_splits"], DEFAULTS["prc_neighborhood"]


def gaussian_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu": (d,), "sigma": (d, d)} of a feature set, as torch-fidelity computes them (float32 features)."""
    if len(features) < 2:
        raise VqgenError(f"FID needs at least 2 images per set, got {len(features)}")
    return metric_fid.fid_features_to_statistics(features.float().cpu())


def frechet_distance(a: dict, b: dict) -> float:
    return float(metric_fid.fid_statistics_to_metric(a, b, verbose=False)[metric_fid.KEY_METRIC_FID])


def kernel_distance(fake: torch.Tensor, real: torch.Tensor, subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over torch-fidelity's 100 random subsets."""
    if min(len(fake), len(real)) < subset_size:
        raise VqgenError(
            f"KID draws subsets of {subset_size} images, but there are {len(fake)} samples and {len(real)} real "
            f"images; pass a smaller --kid_subset_size (at most {min(len(fake), len(real))}) or more images"
        )
    out = metric_kid.kid_features_to_metric(fake.float().cpu(), real.float().cpu(), kid_subset_size=subset_size,
                                            verbose=False)  # fmt: skip
    return float(out[metric_kid.KEY_METRIC_KID_MEAN]), float(out[metric_kid.KEY_METRIC_KID_STD])


def inception_score(logits: torch.Tensor) -> tuple[float, float]:
    """(mean, std) over torch-fidelity's 10 shuffled splits, of the unbiased logits."""
    if len(logits) < IS_SPLITS:
        raise VqgenError(f"the Inception Score splits the samples {IS_SPLITS} ways and needs at least {IS_SPLITS}, "
                         f"got {len(logits)}")  # fmt: skip
    out = metric_isc.isc_features_to_metric(logits.cpu(), splits=IS_SPLITS)
    return float(out[metric_isc.KEY_METRIC_ISC_MEAN]), float(out[metric_isc.KEY_METRIC_ISC_STD])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` with k-NN balls (k = 3), on the Inception pool features
    (torch-fidelity's `calculate_metrics` takes VGG16 features for these by default; the function is the same).
    Computed in blocks of `chunk` rows (torch-fidelity's save_cpu_ram path): memory grows with chunk x N, not N^2."""
    if min(len(fake), len(real)) <= PR_K:
        raise VqgenError(
            f"precision/recall need more than k={PR_K} images per set for the k-th neighbour, got {len(fake)} "
            f"samples and {len(real)} real images"
        )
    out = metric_prc.prc_features_to_metric(fake.float(), real.float(), prc_batch_size=chunk, save_cpu_ram=True,
                                            verbose=False)  # fmt: skip
    return float(out[metric_prc.KEY_METRIC_PRECISION]), float(out[metric_prc.KEY_METRIC_RECALL])

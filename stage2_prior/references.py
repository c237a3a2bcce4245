"""The samples' figures (FID, KID, IS, precision/recall) beside real references of the same size and classes: what
stage-2 sample evaluation adds to torch-fidelity's scores (vqgen.metrics.scores), since a figure on N samples only
means something next to the same figure on N real images drawn like them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vqgen.cli import VqgenError
from vqgen.metrics import scores
from vqgen.metrics.fidelity import ReferenceSplit

logger = logging.getLogger(__name__)


def check_like(samples_shape: tuple, ref_shape: tuple) -> None:
    """Warn once when samples and reference differ in size or channels (both are resized to 299x299 and gray
    is repeated to RGB, as torch-fidelity does, so FID then also measures that difference)."""
    if tuple(samples_shape[-2:]) != tuple(ref_shape[-2:]):
        logger.warning(
            "samples are %sx%s and the reference images %sx%s: both are resized to 299x299 (TF 1.x bilinear) for "
            "Inception, so the figures also measure the size difference",
            *samples_shape[-2:], *ref_shape[-2:],
        )  # fmt: skip
    if samples_shape[-3] != ref_shape[-3]:
        logger.warning(
            "samples have %d channel(s) and the reference images %d: gray images are repeated to RGB for Inception, "
            "so the figures also measure the colour difference",
            samples_shape[-3], ref_shape[-3],
        )  # fmt: skip


def draw_like(
    labels: torch.Tensor, asked: torch.Tensor | None, n: int, generator: torch.Generator, fit: bool = False
) -> torch.Tensor:
    """Indices of n random rows of `labels`, with the class counts of `asked` (N,) when given. `fit` scales the
    counts down evenly when a class has too few rows (the precision/recall subset of a small split) instead of
    raising."""
    if asked is not None and (labels < 0).any():
        raise VqgenError(
            "the samples are class-conditional but the reference split has no labels; score them against a "
            "labelled split, or unconditionally (--unconditional)"
        )
    counts = torch.bincount(asked).tolist() if asked is not None else [n]
    if asked is None:
        pools = [torch.arange(len(labels))]
    else:
        pools = [(labels == c).nonzero().flatten() for c in range(len(counts))]
    scale = min([1.0] + [len(p) / k for p, k in zip(pools, counts) if k > 0])
    if scale < 1 and not fit:
        short = next(c for c, (p, k) in enumerate(zip(pools, counts)) if len(p) < k)
        if asked is None:
            raise VqgenError(
                f"{n} real images are needed for a size-matched reference, the split holds {len(labels)}; lower "
                "the number of samples"
            )
        raise VqgenError(
            f"{counts[short]} samples of class {short} asked, but the real images hold only {len(pools[short])} of "
            "it; lower the number of samples"
        )
    if scale < 1:
        m = sum(int(k * scale) for k in counts)
        logger.info("precision/recall compare with %d real images (the split holds too few for %d)", m, n)
    picks = [p[torch.randperm(len(p), generator=generator)[: int(k * scale)]] for p, k in zip(pools, counts) if k > 0]
    return torch.cat(picks)


def sample_metrics(
    pool: torch.Tensor, logits: torch.Tensor, ref: ReferenceSplit, pr_real: torch.Tensor, kid: int
) -> dict:
    kid_mean, kid_std = scores.kernel_distance(pool, ref.pool, subset_size=kid)
    is_mean, is_std = scores.inception_score(logits)
    precision, recall = scores.precision_recall(pool, pr_real)
    return {
        "fid": scores.frechet_distance(scores.gaussian_stats(pool), ref.stats),
        "kid": kid_mean, "kid_std": kid_std, "inception_score": is_mean, "inception_score_std": is_std,
        "precision": precision, "recall": recall,
    }  # fmt: skip


def score_samples(
    samples: dict,
    asked: torch.Tensor | None,
    ref: ReferenceSplit,
    real_pool=None,
    draws: int = 3,
    kid_subset_size: int | None = None,
) -> dict:
    """Every figure of sample features {"pool", "logits_unbiased"} against `ref`, with real references.

    FID and KID compare with the whole split; precision and recall with a random subset of it of the samples'
    size and class counts (k-NN radii depend on the set size). `real_pool(draw_index) -> (pool, logits)`
    gives the features of a set of real images drawn like the samples (None: no reference)."""
    n = len(samples["pool"])
    kid = min(scores.KID_SUBSET_SIZE, n, len(ref.pool)) if kid_subset_size is None else kid_subset_size
    if kid < scores.KID_SUBSET_SIZE and kid_subset_size is None:
        logger.warning("KID with subsets of %d images (torch-fidelity's default is 1000): %d samples", kid, n)
    pr_real = ref.pool[draw_like(ref.labels, asked, n, torch.Generator().manual_seed(1), fit=True)]
    out = {"num_samples": n, "num_reference": len(ref.pool), "kid_subset_size": kid}
    out.update(sample_metrics(samples["pool"], samples["logits_unbiased"], ref, pr_real, kid))
    if real_pool is not None and draws > 0:
        rows = [sample_metrics(*real_pool(i), ref, pr_real, kid) for i in range(draws)]
        for key in ("fid", "kid", "inception_score", "precision", "recall"):
            values = [r[key] for r in rows]
            spread = {"mean": float(np.mean(values)), "std": float(np.std(values)), "draws": draws}
            out[f"{key}_real_reference"] = spread
    return out

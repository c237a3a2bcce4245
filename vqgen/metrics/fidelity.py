"""Inception features of image sets under Accelerate, the cached statistics of a reference split, and the
field's sample metrics with their size-matched real references.

- `extract` runs a prepared DataLoader of {"images": uint8} through the extractor on every rank and gathers the
  features with `gather_for_metrics` (the rows a prepared loader repeats to pad its last batch are dropped): every
  image counts once and every rank holds the same features in the dataset's order.
- `gather_rows` does the same for rows each rank made itself (samples drawn in chunks): features come back in
  the global row order, so the result does not depend on how many processes drew them.
- `ReferenceSplit` caches a split's features (pool and logits), labels, mean and covariance in one safetensors
  file beside the data, keyed by the split's fingerprint and the extractor's weights digest.
- `score_samples` gives FID, KID, IS and precision/recall of sample features against a reference split, each
  next to the same figure for `draws` sets of real images (the same number, the samples' class counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vqgen.cli import VqgenError
from vqgen.metrics import scores
from vqgen.metrics.inception import InceptionFeatures

logger = logging.getLogger(__name__)
KEYS = ("pool", "logits_unbiased")


def extractor_id(extractor: InceptionFeatures) -> str:
    return "inception-" + extractor.digest[:16]


@torch.no_grad()
def features_of(extractor: InceptionFeatures, images: torch.Tensor, batch_size: int = 100) -> dict:
    """Features of uint8 (N, C, H, W) images on this process, batch by batch on the extractor's device."""
    device = next(extractor.parameters()).device
    out = [extractor(x.to(device)) for x in images.split(batch_size)]
    return {k: torch.cat([o[k] for o in out]).cpu() for k in KEYS}


@torch.no_grad()
def extract(extractor: InceptionFeatures, loader, accelerator=None, transform=None) -> dict:
    """{"pool": (N, 2048), "logits_unbiased": (N, 1008), "labels": (N,)} of a loader of {"images", "labels"}.

    `transform` maps each uint8 batch before the features (e.g. to its reconstruction)."""
    device = next(extractor.parameters()).device
    parts = {k: [] for k in (*KEYS, "labels")}
    for batch in loader:
        images = batch["images"].to(device)
        if transform is not None:
            images = transform(images)
        f = extractor(images)
        labels = batch.get("labels", torch.full((len(images),), -1)).to(device)
        rows = (f["pool"], f["logits_unbiased"], labels)
        if accelerator is not None:
            rows = accelerator.gather_for_metrics(rows)
        for k, v in zip(parts, rows):
            parts[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def eval_batch_size(n: int, batch_size: int, num_processes: int) -> int:
    """The batch of a prepared evaluation loader over n rows: at most each rank's share. Accelerate pads a short
    last batch to the full batch size with repeated rows (dropped again by `gather_for_metrics`), so 3 images in
    batches of 256 would cost 256 Inception forwards per rank."""
    return max(1, min(batch_size, -(-n // num_processes)))


def gather_rows(accelerator, row_ids: torch.Tensor, values: torch.Tensor, total: int) -> torch.Tensor:
    """(total, ...) in global row order from each rank's (n_r,) row ids and (n_r, ...) values (padded to the
    longest rank's count for the collective, the padding dropped)."""
    if accelerator is None or accelerator.num_processes == 1:
        order = torch.argsort(row_ids)
        return values[order]
    count = torch.tensor([len(row_ids)], device=accelerator.device)
    longest = int(accelerator.gather(count).max())
    ids = torch.full((longest,), -1, dtype=torch.long, device=accelerator.device)
    ids[: len(row_ids)] = row_ids.to(accelerator.device)
    padded = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=accelerator.device)
    padded[: len(values)] = values.to(accelerator.device)
    all_ids, all_values = accelerator.gather(ids).cpu(), accelerator.gather(padded).cpu()
    keep = all_ids >= 0
    all_ids, all_values = all_ids[keep], all_values[keep]
    if sorted(all_ids.tolist()) != list(range(total)):
        raise RuntimeError(f"gathered rows {sorted(all_ids.tolist())[:10]}... are not 0..{total - 1}")
    return all_values[torch.argsort(all_ids)]


# Bump when the decoding of a split decoded on the fly changes (resampling, padding, conversion): cached reference
# statistics keyed on an older transform are then never served.
TRANSFORM_VERSION = 1
# The DataConfig fields that change the pixels or labels a split decoded on the fly yields.
PIXEL_AND_LABEL_FIELDS = ("source", "resolution", "channels", "resize_mode", "image_column", "label_column")


def split_fingerprint(split) -> str:
    """What identifies a split's images and labels: their bytes for a split held in memory; for one decoded on
    the fly, the Arrow dataset's fingerprint with every config field that changes the decoded pixels or labels
    (`PIXEL_AND_LABEL_FIELDS`) and the transform's version. Each field is read by name, so a renamed field
    fails here instead of silently dropping out of the key (audit 3, S4-1)."""
    h = hashlib.sha256()
    if getattr(split, "images", None) is not None:
        h.update(split.images.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
    else:
        raw = getattr(split, "raw", None)
        if raw is None or not getattr(raw, "_fingerprint", None):
            raise VqgenError(f"cannot fingerprint split {getattr(split, 'split', '?')!r} to cache its features")
        fields = {name: getattr(split.cfg, name) for name in PIXEL_AND_LABEL_FIELDS}
        key = {"arrow": raw._fingerprint, "split": getattr(split, "split", None), "transform": TRANSFORM_VERSION}
        h.update(json.dumps({**key, **fields}, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class ReferenceSplit:
    """The scored split as the metrics see it: features, labels and Gaussian statistics of its images."""

    pool: torch.Tensor  # (N, 2048)
    logits: torch.Tensor  # (N, 1008)
    labels: torch.Tensor  # (N,), -1 unlabelled
    stats: scores.GaussianStats
    image_shape: tuple  # (C, H, W) of the split's images

    @classmethod
    def load_or_compute(cls, split, loader, extractor, accelerator, cache_dir: Path | None) -> ReferenceSplit:
        shape = tuple(split[0]["images"].shape)
        path = None
        if cache_dir is not None:
            name = f"{split_fingerprint(split)}-{extractor_id(extractor)}.safetensors"
            path = Path(cache_dir) / "fidelity" / name
            if path.is_file():
                t = load_file(str(path))
                logger.info("reference statistics of %s from the cache %s", getattr(split, "split", "split"), path)
                stats = scores.GaussianStats(t["mu"], t["sigma"], len(t["pool"]))
                return cls(t["pool"], t["logits"], t["labels"], stats, shape)
        f = extract(extractor, loader, accelerator)
        ref = cls(f["pool"], f["logits_unbiased"], f["labels"], scores.GaussianStats.of(f["pool"]), shape)
        if path is not None and (accelerator is None or accelerator.is_main_process):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            t = {"pool": ref.pool, "logits": ref.logits, "labels": ref.labels}
            t.update(mu=ref.stats.mu, sigma=ref.stats.sigma)
            save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
            os.replace(tmp, path)  # whole or absent: a killed run never leaves a half-written cache entry
        return ref


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
        "fid": scores.frechet_distance(scores.GaussianStats.of(pool), ref.stats),
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

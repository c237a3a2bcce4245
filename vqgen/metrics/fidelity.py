"""Inception features of image sets under Accelerate (`extract`, `gather_rows`: every image once, in row order,
whatever the number of processes) and the cached features and statistics of a reference split: what vqgen does
around torch-fidelity, which reads its inputs itself, on one process, and caches by input name."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vqgen.metrics import scores
from vqgen.metrics.inception import InceptionFeatures

logger = logging.getLogger(__name__)
KEYS = ("pool", "logits_unbiased")


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
    """(total, ...) in global row order from each rank's (n_r,) row ids and (n_r, ...) values."""
    if accelerator is not None and accelerator.num_processes > 1:
        ids = accelerator.pad_across_processes(row_ids.to(accelerator.device), pad_index=-1)  # (longest,)
        values = accelerator.gather(accelerator.pad_across_processes(values.to(accelerator.device))).cpu()
        row_ids = accelerator.gather(ids).cpu()
        values, row_ids = values[row_ids >= 0], row_ids[row_ids >= 0]  # the padding dropped
    if sorted(row_ids.tolist()) != list(range(total)):
        raise RuntimeError(f"gathered rows {sorted(row_ids.tolist())[:10]}... are not 0..{total - 1}")
    return values[torch.argsort(row_ids)]


@dataclass
class ReferenceSplit:
    """The scored split as the metrics see it: features, labels and Gaussian statistics of its images."""

    pool: torch.Tensor  # (N, 2048)
    logits: torch.Tensor  # (N, 1008)
    labels: torch.Tensor  # (N,), -1 unlabelled
    stats: dict  # torch-fidelity's FID statistics of the pool features: {"mu": (2048,), "sigma": (2048, 2048)}
    image_shape: tuple  # (C, H, W) of the split's images

    @classmethod
    def load_or_compute(cls, split, loader, extractor, accelerator, cache_dir: Path | None) -> ReferenceSplit:
        shape = tuple(split[0]["images"].shape)
        path = None
        if cache_dir is not None:
            # v2: what an entry holds changed (torch-fidelity's statistics, a float32 mean); bump on the next change
            name = f"{split.fingerprint()}-inception-{extractor.digest[:16]}-v2.safetensors"
            path = Path(cache_dir) / "fidelity" / name
            if path.is_file():
                t = load_file(str(path))
                logger.info("reference statistics of %s from the cache %s", getattr(split, "split", "split"), path)
                stats = {"mu": t["mu"].numpy(), "sigma": t["sigma"].numpy()}
                return cls(t["pool"], t["logits"], t["labels"], stats, shape)
        f = extract(extractor, loader, accelerator)
        ref = cls(f["pool"], f["logits_unbiased"], f["labels"], scores.gaussian_stats(f["pool"]), shape)
        if path is not None and (accelerator is None or accelerator.is_main_process):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            t = {"pool": ref.pool, "logits": ref.logits, "labels": ref.labels}
            t.update({k: torch.from_numpy(v) for k, v in ref.stats.items()})
            save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
            os.replace(tmp, path)  # whole or absent: a killed run never leaves a half-written cache entry
        return ref

"""The floor that a VQ-VAE puts under its samples' Frechet ratio: its reconstructions of real digits, scored
like samples (docs/quality.md, "Stage 1: reconstructions bound what samples can reach").

    python -m experiments.recon_floor --model runs/demo/stage1/model [--split test --against validation]
    python -m experiments.recon_floor --model runs/demo/pipeline/vqvae --calibrate --pipeline runs/demo/pipeline

Every sample is a decoding, so no prior can make samples closer to real digits (in the judge's feature space)
than the decoder's reconstructions of real digits are. 1000 class-balanced images of `--split` are encoded
and decoded and scored by `stage2_prior.quality.Judge` against `--against`; the real images themselves are
scored too, as the check of the yardstick (they should sit near 1).

`--calibrate` asks how much of the floor is the decoder's calibration: it fits E[x | decoded value] (64 bins,
piecewise linear, per channel) on 5000 validation reconstructions, for squared error only, and scores the test
reconstructions through that map too. With `--pipeline` it also scores 1000 samples of the pipeline's prior
(its own settings, seeds 1 and 2) decoded as they are and through the map, against the test split.
"""

from __future__ import annotations

import argparse
import json

import torch

from stage1_vqvae.data import DataConfig, load_splits, to_model_input
from stage1_vqvae.model import VQVAE
from stage2_prior.quality import Judge, class_balanced_draw


def reconstruct(model, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> their reconstructions, clamped to [-1, 1], in chunks."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + chunk]).reconstruction for i in range(0, len(x), chunk)]).clamp(-1, 1)


def floor(model_path: str, split: str = "test", against: str = "validation", per_class: int = 100) -> dict:
    model = VQVAE.from_pretrained(model_path).eval()
    images = load_splits(DataConfig(source="mnist"), splits=(split,))[split]
    rows = class_balanced_draw(images.labels, per_class, torch.Generator().manual_seed(0))
    x, asked = to_model_input(images.images[rows]), images.labels[rows]
    recon = reconstruct(model, x)
    judge = Judge(against)
    out = {"model": model_path, "images": split, "scored_against": against}
    for name, imgs in (("real", x), ("reconstructions", recon)):
        s = judge.score(imgs, asked, draws=3)
        out[name] = {k: s[k] for k in ("frechet_distance_ratio", "recognised_as_asked", "precision", "recall")}
    out["psnr"] = float(10 * torch.log10(4 / ((recon - x) ** 2).mean()))
    return out


def fit_calibration(model, images: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """(C, bins) mean real value of the pixels whose decoded value falls in each bin ([-1, 1], bin centres);
    empty bins keep their centre (the identity)."""
    x = to_model_input(images)
    recon = reconstruct(model, x)
    curves = []
    for c in range(x.shape[1]):
        b = ((recon[:, c] + 1) / 2 * (bins - 1)).round().long().flatten()
        count = torch.bincount(b, minlength=bins).double()
        mean = torch.bincount(b, x[:, c].flatten().double(), minlength=bins) / count.clamp_min(1)
        curves.append(torch.where(count > 0, mean, torch.linspace(-1, 1, bins, dtype=torch.float64)).float())
    return torch.stack(curves)  # (C, bins)


def calibrate(images: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """Map (N, C, H, W) decodings through the per-channel curves, linearly between bin centres."""
    bins = curves.shape[1]
    pos = (images.clamp(-1, 1) + 1) / 2 * (bins - 1)
    lo = pos.floor().long().clamp(0, bins - 2)
    w = pos - lo
    out = torch.empty_like(images)
    for c in range(images.shape[1]):
        out[:, c] = curves[c][lo[:, c]] * (1 - w[:, c]) + curves[c][lo[:, c] + 1] * w[:, c]
    return out


def calibration_effect(model_path: str, pipeline: str | None) -> dict:
    """The floor and PSNR of test reconstructions, and optionally samples, raw and through the fitted map."""
    model = VQVAE.from_pretrained(model_path).eval()
    splits = load_splits(DataConfig(source="mnist"), splits=("validation", "test"))
    curves = fit_calibration(model, splits["validation"].images[:5000])
    test = splits["test"]
    x = to_model_input(test.images)
    recon = reconstruct(model, x)
    psnr = lambda r: float((10 * torch.log10(4 / ((r - x) ** 2).flatten(1).mean(1))).mean())  # noqa: E731
    out = {"curve_at": {f"{v:.2f}": float(curves[0][round((v + 1) / 2 * 63)]) for v in (-0.87, -0.49, 0.52, 0.9)}}
    out["test_psnr"] = {"raw": psnr(recon), "calibrated": psnr(calibrate(recon, curves))}
    rows = class_balanced_draw(test.labels, 100, torch.Generator().manual_seed(0))
    judge = Judge("validation")
    for name, imgs in (("raw", recon[rows]), ("calibrated", calibrate(recon[rows], curves))):
        out[f"floor_{name}"] = judge.score(imgs, test.labels[rows], draws=3)["frechet_distance_ratio"]
    if pipeline:
        from stage2_prior.pipeline import VQGenPipeline
        from stage2_prior.quality import sample_pipeline

        pipe = VQGenPipeline.from_pretrained(pipeline)
        judge = Judge("test")
        for seed in (1, 2):
            samples, asked = sample_pipeline(pipe, 100, seed=seed)
            for name, imgs in (("raw", samples), ("calibrated", calibrate(samples, curves))):
                s = judge.score(imgs, asked, draws=3)
                out[f"samples_seed{seed}_{name}"] = {
                    k: s[k] for k in ("frechet_distance_ratio", "recognised_as_asked", "precision", "recall")
                }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a VQ-VAE folder")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--against", default="validation", choices=["validation", "test"])
    parser.add_argument("--calibrate", action="store_true", help="the floor through a validation-fitted map")
    parser.add_argument("--pipeline", help="with --calibrate: also score this pipeline's samples both ways")
    args = parser.parse_args(argv)
    if args.calibrate:
        print(json.dumps(calibration_effect(args.model, args.pipeline), indent=2))
        return
    if args.split == args.against:
        raise SystemExit("--split and --against must differ: an image scored against its own split is no floor")
    print(json.dumps(floor(args.model, args.split, args.against), indent=2))


if __name__ == "__main__":
    main()

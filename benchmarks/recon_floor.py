"""The floor that a VQ-VAE puts under its samples' Frechet ratio: its reconstructions of real digits, scored
like samples (docs/quality.md, "Stage 1: reconstructions bound what samples can reach").

    python -m benchmarks.recon_floor --model runs/demo/stage1/model [--split test --against validation]

Every sample is a decoding, so no prior can make samples closer to real digits (in the judge's feature space)
than the decoder's reconstructions of real digits are. 1000 class-balanced images of `--split` are encoded
and decoded and scored by `stage2_prior.quality.Judge` against `--against`; the real images themselves are
scored too, as the check of the yardstick (they should sit near 1).
"""

from __future__ import annotations

import argparse
import json

import torch

from stage1_vqvae.data import DataConfig, load_splits, to_model_input
from stage1_vqvae.model import VQVAE
from stage2_prior.quality import Judge, class_balanced_draw


def floor(model_path: str, split: str = "test", against: str = "validation", per_class: int = 100) -> dict:
    model = VQVAE.from_pretrained(model_path).eval()
    images = load_splits(DataConfig(source="mnist"), splits=(split,))[split]
    rows = class_balanced_draw(images.labels, per_class, torch.Generator().manual_seed(0))
    x, asked = to_model_input(images.images[rows]), images.labels[rows]
    with torch.no_grad():
        recon = torch.cat([model(x[i : i + 250]).reconstruction for i in range(0, len(x), 250)]).clamp(-1, 1)
    judge = Judge(against)
    out = {"model": model_path, "images": split, "scored_against": against}
    for name, imgs in (("real", x), ("reconstructions", recon)):
        s = judge.score(imgs, asked, draws=3)
        out[name] = {k: s[k] for k in ("frechet_distance_ratio", "recognised_as_asked", "precision", "recall")}
    out["psnr"] = float(10 * torch.log10(4 / ((recon - x) ** 2).mean()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a VQ-VAE folder")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--against", default="validation", choices=["validation", "test"])
    args = parser.parse_args(argv)
    if args.split == args.against:
        raise SystemExit("--split and --against must differ: an image scored against its own split is no floor")
    print(json.dumps(floor(args.model, args.split, args.against), indent=2))


if __name__ == "__main__":
    main()

"""`make bench-photos`: what the MSE, adversarial and perceptual options give on real photographs, offline.

    python -m experiments.photos [--steps 2000] [--vgg FILE]

The photos are the colour photographs that scikit-image and scikit-learn ship inside their wheels (dev-only:
`pip install --no-deps scikit-image scikit-learn`; only their image files are read, neither is imported).
Random crops of 96-192 px, resized to 64x64, make the splits: train from 8 photos (4000 crops), validation
from a 9th (300), test from 2 photos never seen in training (600). Each option trains the same 64x64 RGB model
(f=4, 16x16 codes, K=512) for the same steps, and is scored on the test crops: PSNR, SSIM, codebook usage,
and sharpness, the variance of the Laplacian of the reconstructions over that of the originals (1.0: as
sharp as the photos; MSE's blur shows as < 1). The perceptual rows need VGG16 weights (`--vgg`, or the torch
hub cache); without them they are reported as not run.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench_photos"
TRAIN = ["astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
         "motorcycle_right.png", "retina.jpg", "china.jpg"]  # fmt: skip
VALIDATION = ["rocket.jpg"]
TEST = ["chelsea.png", "flower.jpg"]
CROPS = {"train": 500, "validation": 300, "test": 300}  # per photo


def photo_paths() -> dict[str, Path]:
    import importlib.util

    found = {}
    for package, sub in (("skimage", "data"), ("sklearn", "datasets/images")):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise SystemExit(f"{package} is not installed: pip install --no-deps scikit-image scikit-learn")
        folder = Path(spec.origin).parent / sub
        found.update({p.name: p for p in folder.iterdir() if p.suffix in (".png", ".jpg")})
    missing = [n for n in TRAIN + VALIDATION + TEST if n not in found]
    if missing:
        raise SystemExit(f"photos missing from the installed packages: {missing}")
    return found


def build_dataset(out: Path, seed: int = 0) -> Path:
    import datasets
    from PIL import Image

    if (out / "dataset_dict.json").is_file():
        return out
    paths, rng = photo_paths(), np.random.default_rng(seed)
    splits = {}
    for split, names in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        rows = []
        for name in names:
            photo = Image.open(paths[name]).convert("RGB")
            w, h = photo.size
            for _ in range(CROPS[split]):
                side = int(rng.integers(96, min(192, w, h) + 1))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = photo.resize((64, 64), Image.BICUBIC, box=(x, y, x + side, y + side))
                buf = io.BytesIO()
                crop.save(buf, format="PNG")
                rows.append({"bytes": buf.getvalue(), "path": None})
        splits[split] = datasets.Dataset.from_dict(
            {"image": rows}, features=datasets.Features({"image": datasets.Image()})
        )
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) variance of the 3x3 Laplacian of the luminance."""
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(gray, kernel).flatten(1).var(1)


def score(model_dir: Path, data: Path) -> dict:
    from stage1_vqvae.data import DataConfig, load_splits, to_model_input
    from stage1_vqvae.evaluate import evaluate_model, reconstruction_fidelity
    from stage1_vqvae.model import VQVAE
    from vqgen.metrics import standard
    from vqgen.metrics.standard import MetricsConfig

    model = VQVAE.from_pretrained(model_dir).eval()
    test = load_splits(DataConfig(source=str(data), resolution=64, channels="RGB"), splits=("test",))["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=100)
    metrics = evaluate_model(model, loader)
    ratios = []
    with torch.no_grad():
        for batch in loader:
            x = to_model_input(batch["images"])
            recon = model.decode_codes(model.encode(x)).clamp(-1, 1)
            ratios.append(laplacian_variance((recon + 1) / 2) / laplacian_variance((x + 1) / 2).clamp_min(1e-8))
    metrics["sharpness"] = torch.cat(ratios).median().item()
    # The field's figures when their weight files are in the torch hub cache (else one warning, and "n/a").
    cfg = MetricsConfig(standard="auto")
    nets = (standard.load_inception(cfg), standard.load_lpips(cfg))
    metrics.update(reconstruction_fidelity(model, test, loader, None, *nets))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vgg", default=None, help="VGG16 weights file (default: the torch hub cache)")
    parser.add_argument("--only", default="mse,adversarial,perceptual,perceptual+adversarial")
    args = parser.parse_args(argv)
    data = build_dataset(WORK / "data")
    disc_start = args.steps // 4
    options = {
        "mse": [],
        "adversarial": ["loss.adversarial_weight=0.5", f"loss.disc_start={disc_start}", "loss.disc_layers=2"],
        "perceptual": ["loss.perceptual_weight=1.0"],
        "perceptual+adversarial": [
            "loss.perceptual_weight=1.0",
            "loss.adversarial_weight=0.5",
            f"loss.disc_start={disc_start}",
            "loss.disc_layers=2",
        ],  # fmt: skip
    }
    print(
        "| option | test PSNR (dB) | SSIM | usage | sharpness | rFID | LPIPS | train s |\n" + "|---" * 8 + "|",
        flush=True,
    )
    results = {}
    for name in args.only.split(","):
        extra = list(options[name])
        if "perceptual" in name and args.vgg:
            extra.append(f"loss.perceptual_weights={args.vgg}")
        out = WORK / name
        cmd = [sys.executable, "-m", "stage1_vqvae.train", "--config", str(ROOT / "configs" / "own" / "stage1.yaml")]
        cmd += ["--output_dir", str(out), "--overwrite_output_dir", f"data.source={data}", "model.hidden_channels=64",
                "model.res_channels=32", "train.batch_size=32", f"train.max_steps={args.steps}", "train.eval_every=0",
                "train.checkpoint_every=0", "train.report_to=none", "train.num_workers=0", "train.learning_rate=1e-3",
                "train.warmup_steps=100", "model.dead_code_window=50", *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"
            print(f"| {name} | not run: {reason} | | | | | | |", flush=True)
            continue
        seconds = json.loads((out / "train_summary.json").read_text())["wall_time_s"]
        m = score(out / "model", data)
        results[name] = {**m, "train_seconds": seconds}
        rfid, lpips = (f"{m[k]:.{d}f}" if k in m else "n/a" for k, d in (("rfid", 2), ("lpips", 4)))
        print(
            f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['usage']:.0%} | {m['sharpness']:.2f} | {rfid} | "
            f"{lpips} | {seconds:.0f} |",
            flush=True,
        )
    (WORK / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

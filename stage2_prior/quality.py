"""Honest sample quality for MNIST-like pipelines, measured in the feature space of a small classifier the project
trains itself (no downloaded weights; its numbers are not comparable to Inception FID).

    python -m stage2_prior.quality --pipeline runs/demo/pipeline --per_class 100 --split test --output_dir q/
    python -m stage2_prior.quality --samples runs/demo/samples --split test          # score a sample folder
    python -m stage2_prior.quality --pipeline runs/demo/pipeline --sweep --split validation --output_dir sweep/

Every figure of the samples comes with a size-matched real reference: the same number of real training images,
drawn class-balanced like the samples, several times (mean and spread), scored against the same split. A
Frechet distance is biased upwards at small sample sizes, so only the ratio to that reference means something:

- recognised as asked: the classifier's accuracy on the class each sample was asked for;
- Frechet distance and KID (torchmetrics, with the classifier's 128-d penultimate layer as the feature);
- precision and recall (Kynkaenniemi et al. 2019, k=3 nearest neighbours in the same feature space).

`--sweep` scores a grid of sampling settings on the validation split (never on test) and writes the table;
the chosen setting goes into the prior's config (`sampling.*`) and from there into its generation_config.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stage2_prior import references
from vqgen.cli import VqgenError, run_cli
from vqgen.files import write_json


class SmallClassifier(nn.Module):
    """Two conv blocks and a 128-d feature layer; inputs (B, C, 28, 28)-ish in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        return F.relu(self.fc(x.flatten(1)))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> SmallClassifier:
    """Fit on (N, C, H, W) images in [-1, 1]; seeded, a few seconds to a minute on a CPU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N,) predicted classes for (N, C, H, W) images in [-1, 1]."""
    return torch.cat([model(images[lo : lo + batch_size]).argmax(1) for lo in range(0, len(images), batch_size)])


@torch.no_grad()
def features(model: SmallClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, 128) penultimate-layer features of (N, C, H, W) images in [-1, 1]."""
    return torch.cat([model.features(images[lo : lo + batch_size]) for lo in range(0, len(images), batch_size)])


class _Given(nn.Module):
    """torchmetrics' feature extractor for features computed already (each set is embedded once)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two (N, F) feature sets (torchmetrics' FID on given features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Given(a.shape[1]), normalize=False)
    fid.update(a, real=False)
    fid.update(b, real=True)
    return float(fid.compute())


def kernel_distance(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) between two (N, F) feature sets, averaged over subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=_Given(a.shape[1]), subsets=20, subset_size=min(len(a), len(b), 500))
    kid.update(a, real=False)
    kid.update(b, real=True)
    with torch.random.fork_rng():  # torchmetrics draws its subsets from the global RNG: seed it, then restore
        torch.manual_seed(seed)
        return float(kid.compute()[0])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019): the share of one set inside the union of the
    other's k-NN balls."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # (N,), the k-th neighbour beyond itself

    def inside(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r[None]).any(1).float().mean())

    fake, real = fake.double(), real.double()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def class_balanced_draw(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `per_class` random rows of every class (the layout of class-conditional samples)."""
    picks = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        picks.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(picks)


def draw_like(labels: torch.Tensor, asked: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of random rows with the class counts of `asked` (N,): a real set laid out like the samples,
    whatever classes they were asked for (100 threes get 100 real threes). vqgen.metrics' draw, shared with the
    Inception metrics."""
    return references.draw_like(labels, asked, len(asked), generator)


class Judge:
    """The classifier plus the real images it compares samples with: `train` (the reference draws) and the
    scored split (`test`, or `validation` for choosing settings)."""

    def __init__(self, split: str = "test", cache_dir: str | os.PathLike | None = None):
        from stage1_vqvae.data import DataConfig, load_splits, to_model_input

        if split not in ("validation", "test"):
            raise VqgenError(f"sample quality is scored on validation or test, not {split!r}")
        splits = load_splits(DataConfig(source="mnist", cache_dir=cache_dir), splits=("train", split))
        self.split = split
        self.train_images = to_model_input(splits["train"].images)  # the pool of the real reference draws
        self.train_labels = splits["train"].labels
        self.classifier = cached_classifier(self.train_images, self.train_labels, cache_dir)
        split_x = to_model_input(splits[split].images)
        self.split_features = features(self.classifier, split_x)
        self.split_labels = splits[split].labels
        self.classifier_accuracy = float((predict(self.classifier, split_x) == self.split_labels).float().mean())

    def score(self, samples: torch.Tensor, asked: torch.Tensor, draws: int = 5) -> dict:
        """Every figure for (N, 1, 28, 28) samples in [-1, 1] asked for classes `asked` (N,).

        Frechet distance and KID compare with the whole scored split. Precision and recall compare with a set of
        the same size and class counts drawn at random from it (seeded; a block of the file would follow its
        order, which is not random). Each figure has its real reference: `draws` sets of real training images
        with the samples' class counts, scored the same way."""
        n = len(samples)
        feats = features(self.classifier, samples)
        fd, kid = frechet_distance(feats, self.split_features), kernel_distance(feats, self.split_features)
        scored = self.split_features[draw_like(self.split_labels, asked, torch.Generator().manual_seed(1))]
        precision, recall = precision_recall(feats, scored)
        ref = {"fd": [], "kid": [], "precision": [], "recall": []}
        g = torch.Generator().manual_seed(0)
        for _ in range(draws):  # the same number of real images, with the samples' class counts
            real = features(self.classifier, self.train_images[draw_like(self.train_labels, asked, g)])
            ref["fd"].append(frechet_distance(real, self.split_features))
            ref["kid"].append(kernel_distance(real, self.split_features))
            for key, value in zip(("precision", "recall"), precision_recall(real, scored)):
                ref[key].append(value)

        def reference(key: str) -> dict:
            return {"mean": float(np.mean(ref[key])), "std": float(np.std(ref[key])), "draws": draws}

        return {
            "num_samples": n,
            "scored_against": self.split,
            "recognised_as_asked": float((predict(self.classifier, samples) == asked).float().mean()),
            "frechet_distance": fd,
            "frechet_distance_real_reference": reference("fd"),
            "frechet_distance_ratio": fd / float(np.mean(ref["fd"])),
            "kid": kid,
            "kid_real_reference": reference("kid"),
            "precision": precision,
            "precision_real_reference": reference("precision"),
            "recall": recall,
            "recall_real_reference": reference("recall"),
            "classifier_accuracy": self.classifier_accuracy,
            "feature": "128-d penultimate layer of the project's small MNIST classifier",
        }


def cached_classifier(images: torch.Tensor, labels: torch.Tensor, cache_dir=None, steps: int = 300):
    """The judge's classifier, trained once per training set and kept in the vqgen cache (safetensors)."""
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.sources import _cache_root

    key = hashlib.sha256(images[:: max(1, len(images) // 512)].numpy().tobytes()).hexdigest()[:16]
    path = _cache_root(DataConfig(cache_dir=cache_dir)) / f"judge-{key}-{steps}.safetensors"
    model = SmallClassifier(images.shape[1], int(labels.max()) + 1, images.shape[-1])
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier(images, labels, int(labels.max()) + 1, steps=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model


def sample_pipeline(pipe, per_class: int, seed: int = 0, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (N, C, H, W) in [-1, 1], classes asked (N,)) with `per_class` images of every class."""
    classes = torch.arange(pipe.layout.num_classes).repeat_interleave(per_class)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    settings.setdefault("decoding", "sequential")
    out = pipe(classes=classes, generator=generator, output_type="pt", **settings)
    return out.images * 2 - 1, classes


# Every setting explicit: a value left None would fall back to the prior's own recommendation (its
# generation_config), so a "no top-p" row of a prior that recommends top-p 0.95 silently drew with 0.95.
# top_p 1.0 is "off", and top-k is off (k = K) throughout.
SWEEP = {"guidance_scale": [1.0, 1.5, 2.0, 3.0], "temperature": [0.85, 1.0], "top_p": [1.0, 0.95]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="pipeline folder or Hub repo id to sample from")
    parser.add_argument("--samples", default=None, help="a sample.py output folder to score instead")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--sweep", action="store_true", help="score a grid of settings (on --split validation)")
    parser.add_argument("--output_dir", default=None, help="write quality.json (and sweep.md) here")
    args = parser.parse_args(argv)
    if (args.pipeline is None) == (args.samples is None):
        raise VqgenError("pass --pipeline (to sample) or --samples (a sample.py folder), not both")
    if args.sweep and args.split != "validation":
        raise VqgenError("--sweep chooses settings, which is done on --split validation, never on test")
    judge = Judge(args.split)
    if args.samples:
        result = score_folder(judge, Path(args.samples))
    else:
        from stage2_prior.pipeline import VQGenPipeline

        pipe = VQGenPipeline.from_pretrained(args.pipeline)
        if args.sweep:
            result = sweep(judge, pipe, args.per_class, args.seed)
        else:
            settings = {k: getattr(args, k) for k in ("guidance_scale", "temperature", "top_k", "top_p")}
            samples, asked = sample_pipeline(pipe, args.per_class, args.seed, **settings)
            result = {"settings": pipe.last_stats["settings"], **judge.score(samples, asked)}
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "quality.json", result)
        if args.sweep:
            (out / "sweep.md").write_text(sweep_table(result["rows"]))
    print(json.dumps(result, indent=2))
    return result


def score_folder(judge: Judge, folder: Path) -> dict:
    from PIL import Image

    from stage1_vqvae.data import to_model_input

    info = json.loads((folder / "samples.json").read_text())
    if info.get("classes") is None:
        raise VqgenError(f"{folder} holds unconditional samples; the judge scores class-conditional ones")
    pixels = np.stack([np.array(Image.open(folder / f).convert("L")) for f in info["files"]])  # (N, 28, 28)
    samples = to_model_input(torch.from_numpy(pixels)[:, None])
    return {"settings": info.get("settings"), **judge.score(samples, torch.tensor(info["classes"]))}


def sweep(judge: Judge, pipe, per_class: int, seed: int) -> dict:
    rows = []
    for values in itertools.product(*SWEEP.values()):
        settings = dict(zip(SWEEP, values))
        samples, asked = sample_pipeline(pipe, per_class, seed, top_k=pipe.layout.codebook_size, **settings)
        r = judge.score(samples, asked, draws=3)
        rows.append({**settings, **{k: r[k] for k in ("recognised_as_asked", "frechet_distance_ratio", "kid")}})
        rows[-1].update(precision=r["precision"], recall=r["recall"], fd_reference=r["frechet_distance_real_reference"])
        print(json.dumps(rows[-1]), flush=True)
    return {"split": judge.split, "per_class": per_class, "rows": rows}


def sweep_table(rows: list[dict]) -> str:
    def off(top_p):
        return "-" if (top_p or 1.0) >= 1 else top_p

    head = "| guidance | temperature | top_p | recognised | FD / real | KID | precision | recall |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['guidance_scale']} | {r['temperature']} | {off(r['top_p'])} | {r['recognised_as_asked']:.1%} | "
        f"{r['frechet_distance_ratio']:.2f} | {r['kid']:.4f} | {r['precision']:.2f} | {r['recall']:.2f} |\n"
        for r in rows
    )


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

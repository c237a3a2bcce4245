"""The standard metrics' cost against torch-fidelity's on the same images, same run (a `make bench` row).

    python -m benchmarks.metrics [--num_images 10000] [--batch_size 100] [--weights FILE]

Two sets of `num_images` 32x32 RGB images (a sample set and a reference set), scored for FID, KID, IS and
precision/recall: vqgen (`features_of` + `vqgen.metrics.scores`: torch-fidelity's extractor and metric functions
under vqgen's batching) and torch-fidelity 0.4 (`calculate_metrics` with Inception features for all four), the
two interleaved twice and the faster of each kept. Both use the same Inception file: the real one from the torch
hub cache when it is there, else a random network of the same architecture (the speed is the same; the figures
are then meaningless but must still agree). Drawing samples is not part of it (timed in `benchmarks.run`'s
sampling rows).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import random_inception
from vqgen.metrics import scores
from vqgen.metrics.fidelity import features_of
from vqgen.metrics.inception import InceptionFeatures
from vqgen.metrics.standard import INCEPTION, find_weights


def images(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): smooth random colour fields plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return (smooth + 20 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def vqgen_scores(extractor, fake, real, batch_size: int) -> dict:
    f, r = features_of(extractor, fake, batch_size), features_of(extractor, real, batch_size)
    kid, _ = scores.kernel_distance(f["pool"], r["pool"], subset_size=min(1000, len(fake)))
    precision, recall = scores.precision_recall(f["pool"], r["pool"])
    return {
        "fid": scores.frechet_distance(scores.gaussian_stats(f["pool"]), scores.gaussian_stats(r["pool"])),
        "kid": kid, "is": scores.inception_score(f["logits_unbiased"])[0], "precision": precision, "recall": recall,
    }  # fmt: skip


def fidelity_scores(weights: Path, fake, real, batch_size: int) -> dict:
    import torch_fidelity

    m = torch_fidelity.calculate_metrics(
        input1=Tensors(fake), input2=Tensors(real), cuda=torch.cuda.is_available(), batch_size=batch_size,
        fid=True, kid=True, isc=True, prc=True, feature_extractor="inception-v3-compat",
        kid_subset_size=min(1000, len(fake)), feature_extractor_weights_path=str(weights), save_cpu_ram=True,
        verbose=False, cache=False,
    )  # fmt: skip
    return {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"],
            "is": m["inception_score_mean"], "precision": m["precision"], "recall": m["recall"]}  # fmt: skip


def bench(num_images: int, batch_size: int, weights: str | None, row=None, repeats: int = 2) -> dict:
    path = find_weights(INCEPTION, weights, "--weights")
    tmp = None
    if path is None:  # a random network of the same architecture: the same cost
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "inception-random.pth"
        torch.save(random_inception().state_dict(), path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = InceptionFeatures(path).to(device)
    fake, real = images(num_images, 0), images(num_images, 1)
    times = {"vqgen": [], "torch-fidelity": []}
    results = {}
    for _ in range(repeats):  # interleaved: a drift in machine speed hits both alike
        for name, fn in (("vqgen", lambda: vqgen_scores(extractor, fake, real, batch_size)),
                         ("torch-fidelity", lambda: fidelity_scores(path, fake, real, batch_size))):  # fmt: skip
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    ours, theirs = results["vqgen"], results["torch-fidelity"]
    worst = max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in ours)
    detail = (
        f"{num_images} + {num_images} 32x32 images on {device}: vqgen {best['vqgen']:.1f} s "
        f"({2 * num_images / best['vqgen']:.0f} img/s), torch-fidelity {best['torch-fidelity']:.1f} s; figures agree "
        f"to {worst:.1e} relative ({'real' if tmp is None else 'random'} Inception weights)"
    )
    ratio = best["torch-fidelity"] / best["vqgen"]
    if row is not None:
        row("FID+KID+IS+P/R scoring", f"{ratio:.2f}x torch-fidelity's speed", "no slower (>= 1x)", detail)
    else:
        print(f"| FID+KID+IS+P/R scoring | {ratio:.2f}x torch-fidelity's speed | no slower (>= 1x) | {detail} |")
    if tmp is not None:
        tmp.cleanup()
    return {"ratio": ratio, **best, "worst_relative_difference": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest of each is kept")
    parser.add_argument("--weights", default=None, help="Inception file (default: the torch hub cache, else random)")
    args = parser.parse_args(argv)
    bench(args.num_images, args.batch_size, args.weights, repeats=args.repeats)


if __name__ == "__main__":
    main()

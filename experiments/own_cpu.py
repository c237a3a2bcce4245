"""`make bench-own-cpu`: the README's "Your own images" walkthrough with `configs/own-cpu/`, on real photographs in
three class folders, timed stage by stage and scored on held-out crops.

    python -m experiments.own_cpu [--output_dir runs/own_cpu] [--stage1 KEY=VALUE ...] [--stage2 KEY=VALUE ...]

The folder is what a user would bring: `photos/{train,validation,test}/{class}/NNNNN.png`, 64x64 RGB crops of the
colour photographs inside the scikit-image and scikit-learn wheels (dev-only: `pip install --no-deps scikit-image
scikit-learn`; only their image files are read). Three classes, each a group of photos:
    microscopy  ihc, retina, hubble_deep_field      (stained tissue, a fundus, a deep-sky field)
    motorcycle  motorcycle_left, motorcycle_right    (a stereo pair of one workshop scene)
    scene       astronaut, coffee, chelsea, china, flower, rocket
Every photo is cut into 128 px tiles, and each tile belongs to one split (70/15/15 by a seeded shuffle). The test
crops are therefore other tiles of the training photographs, not other pictures; and the stereo pair's views are
tiled independently, so a test tile of one view can lie inside the other view's training tiles (one does). Crops of
64-128 px inside a tile are resized to 64x64: 1000 per class for train, 150 per class for validation and for test.

The walkthrough runs the README's five commands as they are written (plus `--stage1`/`--stage2` overrides when
choosing sizes), each timed from process start to exit, so import and data decoding count. Then, outside the
timed walkthrough: stage-1 figures on the test split (PSNR, SSIM, codebook usage; rFID and LPIPS when their weight
files are in the torch hub cache), the prior's held-out bits per code, and the samples judged by a small
classifier (`stage2_prior.quality.SmallClassifier`) trained on the training crops and checked on the test crops:
"recognised" is the share of samples it puts in the class they were asked for. A grid of samples per class goes to
OUTPUT_DIR/samples_grid.png (docs/own_cpu_samples.png when `--docs`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {
    "microscopy": ["ihc.png", "retina.jpg", "hubble_deep_field.jpg"],
    "motorcycle": ["motorcycle_left.png", "motorcycle_right.png"],
    "scene": ["astronaut.png", "coffee.png", "chelsea.png", "china.jpg", "flower.jpg", "rocket.jpg"],
}
PER_CLASS = {"train": 1000, "validation": 150, "test": 150}
TILE = 128


def tile_splits(width: int, height: int, rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """The photo's 128 px tiles (top-left corners), shuffled into train/validation/test (70/15/15, at least one
    each)."""
    tiles = [(x * TILE, y * TILE) for y in range(height // TILE) for x in range(width // TILE)]
    order = rng.permutation(len(tiles))
    n_held = max(1, round(0.15 * len(tiles)))
    picked = [tiles[i] for i in order]
    return {"validation": picked[:n_held], "test": picked[n_held : 2 * n_held], "train": picked[2 * n_held :]}


def build_folder(out: Path, seed: int = 0) -> Path:
    """Write the class folders (skipped when they are there already); returns `out`."""
    from PIL import Image

    from experiments.photos import photo_paths

    if (out / "test").is_dir():
        return out
    paths, rng = photo_paths(), np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    for name, photos in CLASSES.items():
        for split in PER_CLASS:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
        for p, photo_name in enumerate(photos):
            photo = Image.open(paths[photo_name]).convert("RGB")
            splits = tile_splits(*photo.size, rng)
            for split, total in PER_CLASS.items():
                count = total // len(photos) + (p < total % len(photos))  # the class total, spread over its photos
                for i in range(count):
                    x0, y0 = splits[split][int(rng.integers(len(splits[split])))]
                    side = int(rng.integers(64, TILE + 1))
                    x, y = x0 + int(rng.integers(0, TILE - side + 1)), y0 + int(rng.integers(0, TILE - side + 1))
                    crop = photo.resize((64, 64), Image.BICUBIC, box=(x, y, x + side, y + side))
                    crop.save(tmp / split / name / f"{Path(photo_name).stem}_{i:05d}.png")
    tmp.rename(out)
    return out


def walkthrough(folder: Path, work: Path, stage1: list[str], stage2: list[str]) -> dict[str, float]:
    """The README's five commands with configs/own-cpu/, outputs under `work`; seconds per command."""
    py = sys.executable
    s1, codes, s2, pipe = work / "stage1", work / "codes", work / "stage2", work / "pipeline"
    commands = {
        "stage 1": [py, "-m", "stage1_vqvae.train", "--config", "configs/own-cpu/stage1.yaml",
                    f"data.source={folder}", f"train.output_dir={s1}", *stage1],
        "extract": [py, "-m", "stage1_vqvae.extract", "--model", f"{s1}/model", "--output_dir", str(codes)],
        "stage 2": [py, "-m", "stage2_prior.train", "--config", "configs/own-cpu/stage2.yaml",
                    f"data.codes={codes}", f"train.output_dir={s2}", *stage2],
        "export": [py, "-m", "stage2_prior.export", "--vqvae", f"{s1}/model", "--prior", f"{s2}/model",
                   "--output_dir", str(pipe)],
        "sample": [py, "sample.py", "--pipeline", str(pipe), "--per_class", "8", "--output_dir",
                   str(work / "samples")],
    }  # fmt: skip
    seconds = {}
    with open(work / "walkthrough.log", "w") as log:
        for name, cmd in commands.items():
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            seconds[name] = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed with exit code {proc.returncode}; see {work / 'walkthrough.log'}")
            print(f"  {name}: {seconds[name]:.0f} s", flush=True)
    return seconds


def split_tensors(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 64, 64) images in [-1, 1] and (N,) class ids of one split of the folder (sorted class names)."""
    from PIL import Image

    images, labels = [], []
    for c, name in enumerate(sorted(CLASSES)):
        for f in sorted((folder / split / name).iterdir()):
            images.append(np.array(Image.open(f).convert("RGB")))
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 64, 64, 3) -> (N, 3, 64, 64)
    return x, torch.tensor(labels)


class CropJudge:
    """A small classifier trained on the training crops, and the features of the split it scores against."""

    def __init__(self, folder: Path, split: str):
        from stage2_prior.quality import features, predict, train_classifier

        self.train_x, self.train_y = split_tensors(folder, "train")
        x, self.labels = split_tensors(folder, split)
        self.classifier = train_classifier(self.train_x, self.train_y, len(CLASSES), steps=400, batch_size=64)
        self.accuracy = float((predict(self.classifier, x) == self.labels).float().mean())
        self.split_features = features(self.classifier, x)

    def score(self, samples: torch.Tensor, asked: torch.Tensor) -> dict:
        """Recognised share (overall and per class) and the Frechet distance in the classifier's feature space,
        over that of the same number of real training crops (the size-matched reference; 1.0: as close as real)."""
        from stage2_prior.quality import draw_like, features, frechet_distance, predict

        recognised = predict(self.classifier, samples) == asked
        fd = frechet_distance(features(self.classifier, samples), self.split_features)
        real = self.train_x[draw_like(self.train_y, asked, torch.Generator().manual_seed(0))]
        fd_real = frechet_distance(features(self.classifier, real), self.split_features)
        per = {name: float(recognised[asked == c].float().mean()) for c, name in enumerate(sorted(CLASSES))}
        return {"recognised": float(recognised.float().mean()), "recognised_per_class": per,
                "frechet_ratio": fd / fd_real, "num_samples": len(samples)}  # fmt: skip


def load_pipeline(work: Path):
    from stage2_prior.pipeline import VQGenPipeline

    pipe = VQGenPipeline.from_pretrained(work / "pipeline")
    if list(pipe.class_names or []) != sorted(CLASSES):
        raise SystemExit(f"the pipeline's classes {pipe.class_names} are not the folder's {sorted(CLASSES)}")
    return pipe


def judge_samples(folder: Path, work: Path, per_class: int, seed: int) -> dict:
    """The test judge's figures for samples drawn with the prior's own settings (no flags), and the grid."""
    from stage2_prior.quality import sample_pipeline

    judge, pipe = CropJudge(folder, "test"), load_pipeline(work)
    start = time.perf_counter()
    samples, asked = sample_pipeline(pipe, per_class, seed=seed)
    seconds = time.perf_counter() - start
    save_grid(samples, asked, split_tensors(folder, "test"), work / "samples_grid.png", columns=10)
    return {**judge.score(samples, asked), "classifier_test_accuracy": judge.accuracy, "sampling_seconds": seconds}


# Sampling settings tried on the validation split (never test); top-p and top-k are off throughout.
SWEEP = {"guidance_scale": [1.0, 1.5, 2.0, 3.0], "temperature": [1.0, 0.9]}


def sweep(folder: Path, work: Path, per_class: int) -> list[dict]:
    """Every SWEEP setting scored on validation; the chosen one is the lowest Frechet ratio among those recognised
    within 5 points of the best, the rule that goes into configs/own-cpu/stage2.yaml's `sampling`."""
    import itertools

    from stage2_prior.quality import sample_pipeline

    judge, pipe = CropJudge(folder, "validation"), load_pipeline(work)
    rows = []
    for g, t in itertools.product(*SWEEP.values()):
        samples, asked = sample_pipeline(pipe, per_class, seed=1, guidance_scale=g, temperature=t, top_p=1.0)
        rows.append({"guidance_scale": g, "temperature": t, **judge.score(samples, asked)})
        print(f"  validation: guidance {g}, temperature {t}: recognised {rows[-1]['recognised']:.1%}, "
              f"Frechet ratio {rows[-1]['frechet_ratio']:.2f}", flush=True)  # fmt: skip
    best = max(r["recognised"] for r in rows)
    chosen = min((r for r in rows if r["recognised"] >= best - 0.05), key=lambda r: r["frechet_ratio"])
    chosen["chosen"] = True
    return rows


def save_grid(samples: torch.Tensor, asked: torch.Tensor, real: tuple, path: Path, columns: int) -> None:
    """Two rows per class, each labelled: `columns` real test crops, then the first `columns` samples."""
    from PIL import Image
    from torchvision.utils import make_grid

    from vqgen.images import labelled_rows

    real_x, real_y = real
    rows, labels = [], []
    for c, name in enumerate(sorted(CLASSES)):
        rows += [real_x[real_y == c][:: max(1, int((real_y == c).sum()) // columns)][:columns],
                 samples[asked == c][:columns]]  # fmt: skip
        labels += [f"{name}: real (test)", f"{name}: samples"]
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=columns, padding=2)  # (3, H, W) in [0, 1]
    pixels = labelled_rows(grid, labels).mul(255).round().byte().permute(1, 2, 0).numpy()  # (3,H,W) -> (H,W,3)
    Image.fromarray(pixels).quantize(256).save(path, optimize=True)  # 256 colours: a small PNG for docs/


def evaluate(work: Path) -> dict:
    """Stage-1 test figures and the prior's held-out bits per code, by the toolkit's own evaluate commands."""
    py = sys.executable
    for cmd, out in (
        ([py, "-m", "stage1_vqvae.evaluate", "--model", f"{work}/stage1/model", "--split", "test"], "eval_stage1"),
        ([py, "-m", "stage2_prior.evaluate", "--prior", f"{work}/stage2/model", "--split", "test"], "eval_stage2"),
    ):
        with open(work / f"{out}.log", "w") as log:
            proc = subprocess.run([*cmd, "--output_dir", str(work / out)], cwd=ROOT, stdout=log, stderr=log)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[2:4])} failed; see {work / out}.log")
    s1 = json.loads((work / "eval_stage1" / "metrics.json").read_text())
    s2 = json.loads((work / "eval_stage2" / "metrics.json").read_text())
    return {"stage1": s1, "stage2": s2}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/own_cpu")
    parser.add_argument("--stage1", nargs="*", default=[], help="extra stage-1 overrides (choosing sizes)")
    parser.add_argument("--stage2", nargs="*", default=[], help="extra stage-2 overrides (choosing sizes)")
    parser.add_argument("--per_class", type=int, default=100, help="samples per class for the judge")
    parser.add_argument("--docs", action="store_true", help="also write docs/own_cpu_samples.png")
    parser.add_argument("--sweep", action="store_true", help="also score the SWEEP settings on validation")
    args = parser.parse_args(argv)
    work = (ROOT / args.output_dir).resolve()
    folder = build_folder(ROOT / "runs" / "bench_photos" / "classes")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"walkthrough on {folder} -> {work}", flush=True)
    seconds = walkthrough(folder, work, args.stage1, args.stage2)
    result = {"seconds": seconds, "total_seconds": sum(seconds.values()), **evaluate(work)}
    if args.sweep:
        result["validation_sweep"] = sweep(folder, work, per_class=50)
    result["samples"] = judge_samples(folder, work, args.per_class, seed=0)
    (work / "result.json").write_text(json.dumps(result, indent=2))
    if args.docs:
        import shutil

        shutil.copy(work / "samples_grid.png", ROOT / "docs" / "own_cpu_samples.png")
    print(report(result, args), flush=True)
    return result


def report(r: dict, args) -> str:
    s1, s2, smp = r["stage1"], r["stage2"], r["samples"]
    rfid = f"{s1['rfid']:.1f}" if "rfid" in s1 else "n/a (no Inception weights)"
    per = ", ".join(f"{k} {v:.0%}" for k, v in smp["recognised_per_class"].items())
    times = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    return (
        f"overrides: stage 1 {args.stage1 or '-'}; stage 2 {args.stage2 or '-'}\n"
        f"walkthrough {r['total_seconds']:.0f} s ({times})\n"
        f"test PSNR {s1['psnr']:.2f} dB, SSIM {s1['ssim']:.3f}, usage {s1['usage']:.0%}, rFID {rfid}\n"
        f"held-out bits per code {s2['bits_per_code']:.3f} (uniform {s2['uniform_bits_per_code']:.1f})\n"
        f"samples recognised {smp['recognised']:.1%} ({per}); classifier test accuracy "
        f"{smp['classifier_test_accuracy']:.1%}"
    )


if __name__ == "__main__":
    main()

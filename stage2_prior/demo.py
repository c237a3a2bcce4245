"""The one-command demo: the whole two-stage pipeline on the built-in MNIST, on a CPU, in minutes.

    make demo                      # = python -m stage2_prior.demo (after creating .venv)
    python -m stage2_prior.demo --out runs/demo

Runs each stage's CLI exactly as a user would (so the demo never reaches into a stage's internals):
stage-1 training, evaluation, code extraction, stage-2 training, evaluation, pipeline export and sampling
(10 images per class). Then it scores the samples with a small MNIST classifier trained here on the train
split (accuracy on the class asked for, and a Frechet distance in its feature space against the test split,
with train-vs-test as the reference), and writes runs/demo/{grid.png, reconstructions.png, metrics.json,
report.md} with wall time per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stage1_vqvae.common import VqgenError, run_cli, write_json

ROOT = Path(__file__).resolve().parent.parent


def run_step(name: str, args: list[str], timings: dict) -> None:
    t0 = time.perf_counter()
    print(f"\n=== {name}: {' '.join(args)}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise VqgenError(f"demo step '{name}' failed (exit {proc.returncode}); see the output above")
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"=== {name}: {timings[name]} s", flush=True)


def sample_quality(samples_dir: Path) -> dict:
    """Classifier accuracy on the conditional samples and Frechet distances in its feature space."""
    import numpy as np
    import torch
    from PIL import Image

    from stage1_vqvae.data import DataConfig, load_splits, to_model_input
    from stage2_prior.quality import frechet_distance, predict, train_classifier

    torch.manual_seed(0)
    splits = load_splits(DataConfig(source="mnist"), splits=("train", "test"))
    train_x, train_y = to_model_input(splits["train"].images), splits["train"].labels
    test_x, test_y = to_model_input(splits["test"].images), splits["test"].labels
    clf = train_classifier(train_x, train_y, 10)
    test_pred, test_feat = predict(clf, test_x)
    info = json.loads((samples_dir / "samples.json").read_text())
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(samples_dir / f).convert("L"))) for f in info["files"]])[
        :, None
    ]  # (N, 1, 28, 28) uint8
    pred, feat = predict(clf, to_model_input(imgs))
    asked = torch.tensor(info["classes"])
    _, train_feat = predict(clf, train_x[:10000])
    return {
        "classifier_test_accuracy": float((test_pred == test_y).float().mean()),
        "samples_recognised_as_asked": float((pred == asked).float().mean()),
        "num_samples": len(asked),
        "frechet_distance_samples_vs_test": frechet_distance(feat, test_feat),
        "frechet_distance_train_vs_test_reference": frechet_distance(train_feat, test_feat),
        "frechet_feature": "128-d penultimate layer of the project's small MNIST classifier",
    }


REPORT = """# vqgen demo report

Built-in MNIST, 2-stage pipeline, CPU. Made by `make demo` (`python -m stage2_prior.demo`).

![samples: one row per class]({grid})

![reconstructions: originals (top) and reconstructions (bottom)](reconstructions.png)

## Stage 1: VQ-VAE (test split)
| MSE | PSNR (dB) | SSIM | codebook usage | perplexity | bits/dim (uniform prior) |
|---|---|---|---|---|---|
| {s1[mse]:.5f} | {s1[psnr]:.2f} | {s1[ssim]:.4f} | {s1[usage]:.3f} | {s1[perplexity]:.1f} | {s1[bits_per_dim]:.4f} |

## Stage 2: prior (test split)
| bits per code | uniform log2 K | two-stage bits/dim | stage-1 bound |
|---|---|---|---|
| {s2[bits_per_code]:.4f} | {s2[uniform_bits_per_code]:.1f} | {two:.4f} | {s1[bits_per_dim]:.4f} |

## Samples ({q[num_samples]} class-conditional, guidance scale {guidance}, temperature {temperature})
- recognised as the class asked for: **{acc:.1%}** (classifier test accuracy {q[classifier_test_accuracy]:.2%})
- Frechet distance to the test split: {q[frechet_distance_samples_vs_test]:.3f}
  (train split vs test split: {q[frechet_distance_train_vs_test_reference]:.3f})

## Wall time per stage (s)
{times}
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--stage1-steps", dest="stage1_steps", type=int, default=None)
    parser.add_argument("--stage2-steps", dest="stage2_steps", type=int, default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo is a fresh, reproducible run every time
    out.mkdir(parents=True)
    t: dict = {}
    s1, s2 = out / "stage1", out / "stage2"
    extra1 = [f"train.max_steps={args.stage1_steps}"] if args.stage1_steps else []
    extra2 = [f"train.max_steps={args.stage2_steps}"] if args.stage2_steps else []
    t_all = time.perf_counter()
    run_step(
        "stage 1 training",
        ["-m", "stage1_vqvae.train", "--config", "configs/mnist/stage1.yaml", f"train.output_dir={s1}", *extra1],
        t,
    )
    run_step(
        "stage 1 evaluation",
        [
            "-m",
            "stage1_vqvae.evaluate",
            "--model",
            str(s1 / "model"),
            "--split",
            "test",
            "--out",
            str(out / "stage1_test.json"),
        ],
        t,
    )
    run_step(
        "code extraction", ["-m", "stage1_vqvae.extract", "--model", str(s1 / "model"), "--out", str(out / "codes")], t
    )
    run_step(
        "stage 2 training",
        [
            "-m",
            "stage2_prior.train",
            "--config",
            "configs/mnist/stage2.yaml",
            f"data.codes={out / 'codes'}",
            f"train.output_dir={s2}",
            *extra2,
        ],
        t,
    )
    run_step(
        "stage 2 evaluation",
        [
            "-m",
            "stage2_prior.evaluate",
            "--prior",
            str(s2 / "model"),
            "--split",
            "test",
            "--out",
            str(out / "stage2_test.json"),
        ],
        t,
    )
    run_step(
        "pipeline export",
        [
            "-m",
            "stage2_prior.export",
            "--vqvae",
            str(s1 / "model"),
            "--prior",
            str(s2 / "model"),
            "--out",
            str(out / "pipeline"),
        ],
        t,
    )
    run_step(
        "sampling",
        [
            "sample.py",
            "--pipeline",
            str(out / "pipeline"),
            "--per-class",
            "10",
            "--seed",
            "0",
            "--guidance-scale",
            str(args.guidance_scale),
            "--temperature",
            str(args.temperature),
            "--out",
            str(out / "samples"),
        ],
        t,
    )
    t0 = time.perf_counter()
    quality = sample_quality(out / "samples")
    t["sample quality"] = round(time.perf_counter() - t0, 1)
    t["total"] = round(time.perf_counter() - t_all, 1)

    shutil.copy(out / "samples" / "grid.png", out / "grid.png")
    if (s1 / "model" / "reconstructions.png").is_file():
        shutil.copy(s1 / "model" / "reconstructions.png", out / "reconstructions.png")
    stage1 = json.loads((out / "stage1_test.json").read_text())
    stage2 = json.loads((out / "stage2_test.json").read_text())
    metrics = {
        "stage1_test": stage1,
        "stage2_test": stage2,
        "samples": quality,
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "wall_time_s": t,
    }
    write_json(out / "metrics.json", metrics)
    times = "\n".join(f"- {k}: {v}" for k, v in t.items())
    (out / "report.md").write_text(
        REPORT.format(
            grid="grid.png",
            s1=stage1,
            s2=stage2,
            two=stage2.get("two_stage", {}).get("bits_per_dim", float("nan")),
            q=quality,
            acc=quality["samples_recognised_as_asked"],
            guidance=args.guidance_scale,
            temperature=args.temperature,
            times=times,
        )
    )
    print(f"\nDemo done in {t['total']} s: {out / 'report.md'}")
    print(json.dumps({k: v for k, v in quality.items() if isinstance(v, float)}, indent=2))
    return metrics


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

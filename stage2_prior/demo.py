"""The one-command demo: the whole two-stage pipeline on the built-in MNIST, on a CPU, in minutes.

    make demo                      # = python -m stage2_prior.demo (after creating .venv)
    vqgen-demo --output_dir runs/demo

Runs each stage's CLI in a subprocess exactly as a user would, with the built-in configs (so it works from an
installed wheel as from a checkout): stage-1 training, evaluation, code extraction, stage-2 training,
evaluation, pipeline export and sampling (100 images per class, with the prior's recommended sampling settings:
no flags). Then it scores the samples with `stage2_prior.quality` against the test split: recognised as asked,
Frechet distance and KID next to a size-matched real reference, precision and recall. It writes
OUTPUT_DIR/{grid.png, reconstructions.png, metrics.json, report.md} with the wall time per stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vqgen.cli import VqgenError, run_cli
from vqgen.files import write_json


def run_step(name: str, args: list, timings: dict) -> None:
    args = [str(a) for a in args]
    t0 = time.perf_counter()
    print(f"\n=== {name}: {' '.join(args)}", flush=True)
    if subprocess.run([sys.executable, *args]).returncode != 0:
        raise VqgenError(f"demo step '{name}' failed; see the output above")
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"=== {name}: {timings[name]} s", flush=True)


def sample_quality(samples_dir: Path) -> dict:
    """The honest metrics of `stage2_prior.quality` for the sample folder, against the test split."""
    from stage2_prior.quality import Judge, score_folder

    return score_folder(Judge("test"), samples_dir)


def compact_grid(samples_dir: Path, path: Path, per_class: int) -> None:
    """The first `per_class` samples of every class as a labelled grid (the sample folder's own is 100 wide)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    from vqgen.images import labelled_rows

    info = json.loads((samples_dir / "samples.json").read_text())
    rows: dict = {}
    for name, c in zip(info["files"], info["classes"]):
        if len(rows.setdefault(c, [])) < per_class:
            rows[c].append(np.array(Image.open(samples_dir / name).convert("L")))
    images = torch.from_numpy(np.stack([im for c in sorted(rows) for im in rows[c]])).float()[:, None] / 255
    grid = make_grid(images, nrow=per_class, padding=2)
    save_image(labelled_rows(grid, [info["class_names"][c] for c in sorted(rows)]), path)


REPORT = """\
# vqgen demo report

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

## Samples: {q[num_samples]} class-conditional, with the pipeline's own settings (no flags: {sampling})
| recognised as asked | Frechet distance | real reference (same size) | ratio | KID | real KID |
|---|---|---|---|---|---|
| {q[recognised_as_asked]:.1%} | {q[frechet_distance]:.2f} | {fd_ref[mean]:.2f} +- {fd_ref[std]:.2f} \
| {q[frechet_distance_ratio]:.2f} | {q[kid]:.4f} | {kid_ref[mean]:.4f} +- {kid_ref[std]:.4f} |

| precision | real precision | recall | real recall |
|---|---|---|---|
| {q[precision]:.2f} | {p_ref[mean]:.2f} +- {p_ref[std]:.2f} | {q[recall]:.2f} | {r_ref[mean]:.2f} +- {r_ref[std]:.2f} |

All against the test split, in the feature space of the project's MNIST classifier (test accuracy
{q[classifier_accuracy]:.2%}). The real reference is {q[num_samples]} training images drawn with the samples'
class counts, {fd_ref[draws]} draws (mean +- sd): a Frechet distance is biased upwards at small sample sizes,
so only the ratio to it means something. Precision and recall compare with a random subset of the test split
of the same size and class counts. These numbers are the demo's own judge, not Inception FID: a 128-d feature
of a small MNIST classifier sees digits, where Inception-V3 (trained on ImageNet photographs) sees 28x28 gray
strokes blown up to 299x299; the two scales are not comparable, and neither is comparable with published
FIDs on other datasets.

## Standard figures (Inception-V3 as torch-fidelity defines them; vqgen.metrics)
{standard}

## Wall time per stage (s)
{times}
"""


# The demo's Inception work is capped: on 2 CPU cores Inception-V3 runs at about 7 images/s (docs/benchmarks.md),
# and the full 10k-image splits (rFID at the end of training and in evaluation, FID against the whole test split)
# took 44k forwards, 1 h 45 min, beside a 6-minute demo (audit 3, S4-8). Training and the stage-1 evaluation run
# without them; one capped step computes the row, and its size is said first.
RFID_IMAGES = 1000  # test images for rFID/LPIPS (each scored with its reconstruction: twice as many forwards)
FID_TEST_IMAGES = 2000  # test images the samples' FID is against (>= 100 per class for the class-matched P/R)
INCEPTION_IMAGES_PER_S = 7.0  # measured on the 2-core development machine (docs/benchmarks.md)


def standard_figures(out: Path, t: dict, num_samples: int) -> dict | str:
    """The Inception figures (rFID/LPIPS of the first RFID_IMAGES test images; FID, KID, IS, precision/recall of
    the samples against the first FID_TEST_IMAGES, one size-matched real draw) when the Inception file is in the
    torch hub cache, after saying how long they will take; else the one line a user gets, saying where to get it."""
    from vqgen.metrics.standard import INCEPTION, find_weights, missing_message

    if find_weights(INCEPTION, None, "--inception_weights") is None:
        return "error: " + missing_message(INCEPTION, "--inception_weights")
    forwards = 2 * RFID_IMAGES + num_samples + FID_TEST_IMAGES + num_samples
    minutes = forwards / INCEPTION_IMAGES_PER_S / 60
    print(
        f"\n=== the Inception row: about {forwards} Inception-V3 forwards, {minutes:.0f} min at the "
        f"{INCEPTION_IMAGES_PER_S:.0f} images/s of 2 CPU cores (far less on a GPU); --inception off skips it",
        flush=True,
    )
    run_step(
        "Inception rFID/LPIPS",
        ["-m", "stage1_vqvae.evaluate", "--model", out / "stage1" / "model", "--split", "test",
         f"data.max_samples={RFID_IMAGES}", "--output_dir", out / "stage1_inception"],
        t,
    )  # fmt: skip
    run_step(
        "Inception sample metrics",
        ["-m", "stage2_prior.evaluate_samples", "--samples", out / "samples", "--split", "test",
         "--reference_draws", "1", f"data.max_samples={FID_TEST_IMAGES}", "--output_dir", out / "samples_inception"],
        t,
    )  # fmt: skip
    figures = json.loads((out / "samples_inception" / "metrics.json").read_text())
    stage1 = json.loads((out / "stage1_inception" / "metrics.json").read_text())
    return {**figures, **{k: stage1[k] for k in ("rfid", "lpips") if k in stage1}}


def standard_table(inception: dict | str) -> str:
    if isinstance(inception, str):
        return f"Not computed:\n\n    {inception}\n"
    head = (
        f"| rFID ({RFID_IMAGES} test) | LPIPS ({RFID_IMAGES} test) | FID (vs {FID_TEST_IMAGES} test) | real FID | "
        "KID | IS | precision | recall |\n" + "|---" * 8 + "|\n"
    )
    ref, nan = inception["fid_real_reference"], float("nan")
    stage1 = inception
    return head + (
        f"| {stage1.get('rfid', nan):.2f} | {stage1.get('lpips', nan):.4f} | {inception['fid']:.2f} | "
        f"{ref['mean']:.2f} +- {ref['std']:.2f} | {inception['kid']:.4f} | {inception['inception_score']:.2f} | "
        f"{inception['precision']:.2f} | {inception['recall']:.2f} |\n"
    )


def pipeline_steps(out: Path, args) -> list[tuple[str, list]]:
    """(name, command line) of each stage, run as a user runs them. The full-split rFID/LPIPS of training's final
    figures and of the stage-1 evaluation are off: the capped Inception row (`standard_figures`) replaces them."""
    s1, s2, codes, pipe = out / "stage1", out / "stage2", out / "codes", out / "pipeline"
    steps1 = [f"train.max_steps={args.stage1_steps}"] if args.stage1_steps else []
    steps2 = [f"train.max_steps={args.stage2_steps}"] if args.stage2_steps else []
    sampling = ["--per_class", args.per_class, "--seed", "0"]  # no sampling flags: the prior's recommended ones
    return [
        ("stage 1 training",
         ["-m", "stage1_vqvae.train", "--config", "mnist/stage1", "--output_dir", s1, *steps1, "metrics.standard=off"]),
        ("stage 1 evaluation",
         ["-m", "stage1_vqvae.evaluate", "--model", s1 / "model", "--output_dir", out / "stage1_test",
          "--standard_metrics", "off"]),
        ("code extraction", ["-m", "stage1_vqvae.extract", "--model", s1 / "model", "--output_dir", codes]),
        ("stage 2 training",
         ["-m", "stage2_prior.train", "--config", "mnist/stage2", f"data.codes={codes}", "--output_dir", s2, *steps2]),
        ("stage 2 evaluation",
         ["-m", "stage2_prior.evaluate", "--prior", s2 / "model", "--output_dir", out / "stage2_test"]),
        ("pipeline export",
         ["-m", "stage2_prior.export", "--vqvae", s1 / "model", "--prior", s2 / "model", "--output_dir", pipe]),
        ("sampling", ["-m", "sample", "--pipeline", pipe, *sampling, "--output_dir", out / "samples"]),
    ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--per_class", type=int, default=100, help="samples of every class to score")
    parser.add_argument("--stage1_steps", type=int, default=None)
    parser.add_argument("--stage2_steps", type=int, default=None)
    parser.add_argument(
        "--inception", default="auto", choices=["auto", "off"],
        help="auto: the capped Inception row when torch-fidelity's file is in the torch hub cache",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo is a fresh, reproducible run every time
    out.mkdir(parents=True)
    t: dict = {}
    s1 = out / "stage1"
    t_all = time.perf_counter()
    for name, step_args in pipeline_steps(out, args):
        run_step(name, step_args, t)
    t0 = time.perf_counter()
    quality = sample_quality(out / "samples")
    t["sample quality"] = round(time.perf_counter() - t0, 1)
    off = "skipped (--inception off)"
    inception = standard_figures(out, t, 10 * args.per_class) if args.inception == "auto" else off
    t["total"] = round(time.perf_counter() - t_all, 1)

    compact_grid(out / "samples", out / "grid.png", per_class=10)
    if (s1 / "model" / "reconstructions.png").is_file():
        shutil.copy(s1 / "model" / "reconstructions.png", out / "reconstructions.png")
    stage1 = json.loads((out / "stage1_test" / "metrics.json").read_text())
    stage2 = json.loads((out / "stage2_test" / "metrics.json").read_text())
    metrics = {
        "stage1_test": stage1,
        "stage2_test": stage2,
        "samples": quality,
        "samples_inception": inception,
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
            fd_ref=quality["frechet_distance_real_reference"],
            kid_ref=quality["kid_real_reference"],
            p_ref=quality["precision_real_reference"],
            r_ref=quality["recall_real_reference"],
            sampling=json.loads((out / "samples" / "samples.json").read_text())["sampling"],
            standard=standard_table(inception),
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

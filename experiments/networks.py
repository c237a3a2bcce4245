"""The paper's network against the VQGAN network (model.arch: vqgan) on real photographs, at equal wall-clock.

    python -m experiments.networks [--budget 1200] [--prior_steps 800] [--reuse]

The data are `experiments/photos.py`'s crops (64x64 RGB; train from 8 photos, validation from a 9th, test from 2
photos never seen in training). Each network trains for the same wall-clock budget on this machine: a short
calibration run of each measures its seconds per step (the difference of a 10-step and a 40-step run, so start-up
and k-means init cancel), and each then trains `budget / (s per step)` steps with the same recipe (batch 32,
Adam 1e-3 with a 100-step warm-up and cosine decay to 5%, EMA codebook with k-means init and restarts, K=512,
f=4: 16x16 codes). Scored on the test crops: PSNR, SSIM, codebook usage. Then the same prior (configs/own-cpu's
GPT, unconditional, `--prior_steps` steps) is trained on each network's codes, and its test bits per code say how
well each network's codes can be modelled (lower: easier for any prior).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from experiments.photos import build_dataset, score
from stage1_vqvae.model import VQVAE

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench_networks"
COMMON = [
    "model.codebook_size=512", "model.codebook_dim=64", "model.downsample=4", "train.batch_size=32",
    "train.learning_rate=1e-3", "train.warmup_steps=100", "train.min_lr_ratio=0.05", "model.dead_code_window=50",
    "train.eval_every=0", "train.checkpoint_every=0", "train.report_to=none", "train.num_workers=0",
]  # fmt: skip
NETWORKS = {
    # configs/own-cpu's network: 64 channels, 2 residual blocks of 32, no normalisation, no attention.
    "paper": ["model.hidden_channels=64", "model.res_channels=32", "model.num_res_blocks=2"],
    # The field's f4 network (taming's VQ-f4: ch 128, ch_mult 1,2,4, 2 residual blocks) at a quarter of its width.
    "vqgan": ["model.arch=vqgan", "model.block_out_channels=[32,64,128]", "model.layers_per_block=2",
              "model.latent_channels=64"],
}  # fmt: skip


def train(name: str, data: Path, steps: int, out: Path, reuse: bool = False) -> dict:
    summary = out / "train_summary.json"
    if reuse and summary.is_file() and json.loads(summary.read_text())["steps"] == steps:
        return json.loads(summary.read_text())  # this run, already trained (--reuse)
    cmd = [sys.executable, "-m", "stage1_vqvae.train", "--config", str(ROOT / "configs" / "own-cpu" / "stage1.yaml")]
    cmd += [f"train.output_dir={out}", "--overwrite_output_dir", f"data.source={data}", f"train.max_steps={steps}"]
    proc = subprocess.run([*cmd, *COMMON, *NETWORKS[name]], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} stage 1 failed: {proc.stderr[-2000:]}")
    return json.loads((out / "train_summary.json").read_text())


def seconds_per_step(name: str, data: Path, reuse: bool) -> float:
    short, long = (train(name, data, n, WORK / f"calibrate-{name}-{n}", reuse)["wall_time_s"] for n in (10, 40))
    return (long - short) / 30


def prior_bits(model_dir: Path, work: Path, steps: int, reuse: bool) -> dict:
    if reuse and (work / "eval_prior" / "metrics.json").is_file():
        return json.loads((work / "eval_prior" / "metrics.json").read_text())
    py = sys.executable
    codes, prior = work / "codes", work / "stage2"
    for cmd in (
        [py, "-m", "stage1_vqvae.extract", "--model", str(model_dir), "--output_dir", str(codes),
         "--overwrite_output_dir"],
        [py, "-m", "stage2_prior.train", "--config", "configs/own-cpu/stage2.yaml", f"data.codes={codes}",
         f"train.output_dir={prior}", "--overwrite_output_dir", "data.conditional=false", f"train.max_steps={steps}",
         "train.eval_every=0", "train.checkpoint_every=0", "train.report_to=none"],
        [py, "-m", "stage2_prior.evaluate", "--prior", str(prior / "model"), "--split", "test", "--output_dir",
         str(work / "eval_prior")],
    ):  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[2:4])} failed: {proc.stderr[-2000:]}")
    return json.loads((work / "eval_prior" / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1200.0, help="stage-1 training seconds per network")
    parser.add_argument("--prior_steps", type=int, default=800)
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in runs/bench_networks")
    args = parser.parse_args(argv)
    data = build_dataset(ROOT / "runs" / "bench_photos" / "data")
    pace = {name: seconds_per_step(name, data, args.reuse) for name in NETWORKS}  # both measured before either long run
    print(f"seconds per step: {json.dumps({k: round(v, 3) for k, v in pace.items()})}", flush=True)
    print(
        "| network | parameters | steps | train s | test PSNR (dB) | SSIM | usage | prior test bits/code |\n"
        + "|---" * 8
        + "|",
        flush=True,
    )
    results = {}
    for name in NETWORKS:
        steps = max(1, int(args.budget / pace[name]))
        summary = train(name, data, steps, WORK / name, args.reuse)
        m = score(WORK / name / "model", data)
        prior = prior_bits(WORK / name / "model", WORK / name, args.prior_steps, args.reuse)
        results[name] = dict(steps=steps, summary=summary, stage1=m, prior=prior, seconds_per_step=pace[name])
        model = VQVAE.from_pretrained(WORK / name / "model")
        params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
        print(
            f"| {name} | {params} | {steps} | {summary['wall_time_s']:.0f} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
            f"{m['usage']:.0%} | {prior['bits_per_code']:.3f} |",
            flush=True,
        )
    (WORK / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

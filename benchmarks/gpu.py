"""The GPU check (issue 12): the pipeline under bf16 on CUDA, the first steps of the CIFAR-10 and 256-px
configs, and jacobi decoding against the sequential loop, on whatever CUDA card runs it.

    python -m benchmarks.gpu [--only pipeline,configs,jacobi] [--work runs/bench_gpu]

Nothing here names a device: Accelerate picks the card for training and extraction, and sampling takes the
pipeline's. The configs' own Hub datasets are out of reach on an offline machine, so they train on the
built-in MNIST resized to their resolution and channels (the shapes and the FLOPs are theirs; decoding a
28-px PNG is cheaper than a photo's JPEG). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import ROWS, row

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> float:
    """Run a CLI to completion; seconds it took. Its output stays visible (the device returns the tail)."""
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def launch(module: str, *args: str) -> list[str]:
    """`accelerate launch` on one process with bf16, as the README tells a user with one GPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", module, *args]  # fmt: skip


def bench_pipeline(work: Path) -> None:
    """stage 1 -> extraction -> stage 2 -> sample.py on the card, bf16: it runs, and every figure is finite."""
    s1, codes, s2, out = work / "tiny_s1", work / "tiny_codes", work / "tiny_s2", work / "tiny_samples"
    common = ["--overwrite_output_dir", "train.mixed_precision=bf16"]
    t = run(launch("stage1_vqvae.train", "--config", "tiny/stage1", "--output_dir", str(s1), *common))
    t += run(launch("stage1_vqvae.extract", "--model", str(s1 / "model"), "--output_dir", str(codes),
                    "--overwrite_output_dir"))  # fmt: skip
    t += run(launch("stage2_prior.train", "--config", "tiny/stage2", "--output_dir", str(s2), *common,
                    f"data.codes={codes}"))  # fmt: skip
    t += run([sys.executable, "sample.py", "--vqvae", str(s1 / "model"), "--prior", str(s2 / "model"),
              "--per_class", "2", "--output_dir", str(out), "--overwrite_output_dir",
              "--decoding", "jacobi"])  # fmt: skip
    s1_sum = json.loads((s1 / "train_summary.json").read_text())
    s2_sum = json.loads((s2 / "train_summary.json").read_text())
    samples = json.loads((out / "samples.json").read_text())
    on_card = s1_sum["peak_accelerator_memory_gib"] is not None and s2_sum["peak_accelerator_memory_gib"] is not None
    finite = all(v == v for v in (s1_sum["validation"]["psnr"], s2_sum["validation"]["bits_per_code"]))
    row(
        "tiny pipeline under bf16 (train -> extract -> prior -> sample.py --decoding jacobi)",
        f"{'ran' if on_card else 'did NOT run'} on the card, figures {'finite' if finite else 'NOT finite'}",
        "runs on CUDA, device from Accelerate",
        f"{t:.0f} s in all (launcher start-up included); stage 1 val PSNR {s1_sum['validation']['psnr']:.2f} dB; "
        f"prior val {s2_sum['validation']['bits_per_code']:.3f} bits/code; samples on "
        f"{samples.get('device', '?')}, decoding {samples.get('decoding', '?')}",
    )


def bench_configs(work: Path, cifar_steps: int, ffhq_steps: int, overrides: list[str]) -> None:
    """The first steps of the CIFAR-10 and 256-px configs: steady img/s after the first log interval, peak memory."""
    faces = ["loss.perceptual_weight=0", "train.num_workers=12"]  # no VGG16 weights offline
    cases = [
        ("cifar10", "bf16", cifar_steps, []),
        ("cifar10", "no", cifar_steps, []),
        ("ffhq256", "bf16", ffhq_steps, ["loss.disc_start=0", *faces]),
        ("ffhq256", "bf16", ffhq_steps, ["loss.disc_start=1000000", *faces]),
    ]
    for name, precision, steps, extra in cases:
        out = work / f"cfg_{name}_{precision}_{len(ROWS)}"
        log_every = max(steps // 5, 1)
        cmd = launch("stage1_vqvae.train", "--config", f"{name}/stage1", "--output_dir", str(out),
                     "--overwrite_output_dir", "data.source=mnist", "train.report_to=none", "train.eval_every=0",
                     "train.checkpoint_every=0", f"train.max_steps={steps}", f"train.log_every={log_every}",
                     f"train.mixed_precision={precision}", "train.eval_max_batches=2", *extra, *overrides)  # fmt: skip
        if precision == "no":
            cmd[cmd.index("--mixed_precision") + 1] = "no"
        wall = run(cmd)
        s = json.loads((out / "train_summary.json").read_text())
        disc = next((e for e in extra if e.startswith("loss.disc_start")), None)
        what = {
            "loss.disc_start=0": "discriminator on",
            "loss.disc_start=1000000": "discriminator off",
            None: "",
        }[disc]
        batch = yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"]
        peak = s["peak_accelerator_memory_gib"]
        row(
            f"configs/{name} stage 1, {precision if precision != 'no' else 'fp32'}, batch {batch}"
            + (f", {what}" if what else ""),
            f"{s['images_per_s_after_first_log']:.0f} img/s",
            "recorded",
            f"peak GPU memory {'-' if peak is None else f'{peak:.2f} GiB'}; {steps} steps, rate after the first "
            f"{log_every}; whole run {wall:.0f} s with start-up; MNIST at the config's size",
        )


def bench_jacobi(pipeline: str, repeats: int) -> None:
    """Jacobi decoding against the sequential eager loop on the card (the demo's prior)."""
    from benchmarks.common import timeit
    from stage2_prior.pipeline import VQGenPipeline
    from stage2_prior.sampling import sample_codes

    pipe = VQGenPipeline.from_pretrained(pipeline).to("cuda" if torch.cuda.is_available() else "cpu")
    prior, device = pipe.prior, pipe.device
    for batch, images in ((1, 8), (10, 20), (100, 100)):
        for guidance in (1.0, 3.0):
            classes = torch.arange(images) % pipe.layout.num_classes
            forwards: dict = {}

            def draw(decoding, window=16, images=images, classes=classes, guidance=guidance, batch=batch, fw=forwards):
                stats: dict = {}
                g = torch.Generator(device=device).manual_seed(0)
                sample_codes(prior, images, classes=classes, guidance_scale=guidance, generator=g, batch_size=batch,
                             decoding=decoding, window=window, stats=stats)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.synchronize()
                fw[(decoding, window)] = stats["forwards"] / (images / batch)

            fns = {"sequential": lambda: draw("sequential")}
            fns |= {f"jacobi{w}": (lambda w=w: draw("jacobi", w)) for w in (8, 16, 32)}
            t = timeit(fns, repeats, warmup=1)
            best = min((8, 16, 32), key=lambda w: t[f"jacobi{w}"])
            per = images / batch
            row(
                f"jacobi decoding on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
                f"batch {batch}{', guidance 3' if guidance != 1 else ''}",
                f"{forwards[('sequential', 16)] / forwards[('jacobi', best)]:.2f}x fewer forwards, "
                f"{t['sequential'] / t[f'jacobi{best}']:.2f}x less time (window {best})",
                "recorded",
                f"ms per batch: sequential {t['sequential'] * 1e3 / per:.0f}, "
                + ", ".join(f"window {w} {t[f'jacobi{w}'] * 1e3 / per:.0f}" for w in (8, 16, 32)),
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="pipeline,configs,jacobi")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_gpu"))
    parser.add_argument("--pipeline", default=str(ROOT / "runs" / "demo" / "pipeline"))
    parser.add_argument("--cifar_steps", type=int, default=300)
    parser.add_argument("--ffhq_steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", nargs="*", default=[], help="dotted overrides for every config run")
    parser.add_argument("--table", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("| benchmark | figure | target | detail |\n|---|---|---|---|", flush=True)
    only = args.only.split(",")
    steps = {
        "pipeline": lambda: bench_pipeline(work),
        "configs": lambda: bench_configs(work, args.cifar_steps, args.ffhq_steps, args.override),
        "jacobi": lambda: bench_jacobi(args.pipeline, args.repeats),
    }
    for name in only:
        try:
            steps[name]()
        except Exception as e:  # one failed part must not cost the others' figures on a lent machine
            row(f"{name}", f"FAILED: {type(e).__name__}: {e}", "", "")
        if args.table:
            lines = ["| benchmark | figure | target | detail |", "|---|---|---|---|"]
            lines += [f"| {' | '.join(r)} |" for r in ROWS]
            Path(args.table).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Every 2-process command, run many times under torchrun: how often a rank exits non-zero after its work was done,
how often a rank warns that the process group was never destroyed (issue 36), and how often a rank reached the
interpreter's teardown, where gloo's threads can abort it (tests/launch_probe).

    python -m experiments.launcher_exits --runs 50 [--commands evaluate,extract] [--busy] --work runs/launcher_exits

The tiny models and data are made once in --work (a 16x16 image folder, a 4-step VQ-VAE, its codes, a 2-step
prior, the pipeline, a random Inception file in torch-fidelity's format for the sample metrics). Then each command
runs --runs times in 2 CPU processes (`torch.distributed.run --nproc_per_node 2`, one thread each; train2_fsdp
under `accelerate launch` with the shipped FSDP config), each time on a fresh port and into a fresh output
folder. `--busy` keeps one CPU-bound process running beside them (the aborts were seen on a loaded machine).
Prints one line per command: runs, failures (launcher exit code != 0), aborts (`terminate called` or SIGABRT in
the output), undestroyed-group warnings, runs where a rank reached the teardown, and seconds per run; with --log,
the output of every failed run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY1, TINY2 = ROOT / "configs" / "tiny" / "stage1.yaml", ROOT / "configs" / "tiny" / "stage2.yaml"
WARNING = "destroy_process_group"


def make_images(root: Path) -> Path:
    """{train,validation,test}/{a,b}/*.png, 16x16 gray: 24/3/8 images (3 validation images: 2 ranks pad them)."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", (12, 12)), ("test", (4, 4)), ("validation", (2, 1))):
        for cls, n in enumerate(counts):
            d = root / split / "ab"[cls]
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 64, (16, 16), dtype=np.uint8)  # (16, 16)
                pixels[4:12, 6 + 2 * cls : 10 + 2 * cls] = 255  # a class-dependent bar
                Image.fromarray(pixels).save(d / f"{i:03d}.png")
    return root


def random_inception(path: Path) -> Path:
    from benchmarks.common import random_inception as build

    torch.save(build().state_dict(), path)
    return path


def setup(work: Path) -> dict[str, Path]:
    """The tiny artefacts every command reads (made once, reused by later invocations)."""
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.extract import extract
    from stage1_vqvae.model import VQVAE
    from stage1_vqvae.train import main as train1
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline
    from stage2_prior.train import main as train2

    paths = {
        "images": work / "images",
        "vqvae": work / "s1" / "model",
        "codes": work / "codes",
        "prior": work / "s2" / "model",
        "pipeline": work / "pipeline",
        "inception": work / "inception.pth",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(work, ignore_errors=True)
    make_images(paths["images"])
    common = ["train.eval_every=0", "train.checkpoint_every=0", "train.report_to=none"]
    train1(["--config", str(TINY1), f"train.output_dir={work / 's1'}", f"data.source={paths['images']}",
            "data.max_samples=null", "train.batch_size=8", "train.max_steps=4", *common])  # fmt: skip
    data = DataConfig(source=str(paths["images"]), resolution=16, resize_mode="stretch")
    extract(VQVAE.from_pretrained(paths["vqvae"]), data, paths["codes"], model_location=str(paths["vqvae"]))
    train2(["--config", str(TINY2), f"train.output_dir={work / 's2'}", f"data.codes={paths['codes']}",
            "train.max_steps=2", *common])  # fmt: skip
    VQGenPipeline(VQVAE.from_pretrained(paths["vqvae"]), load_prior(paths["prior"])).save_pretrained(paths["pipeline"])
    random_inception(paths["inception"])
    return paths


def commands(p: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each command users run under a launcher, at test size, writing into `out`."""
    train2 = ["-m", "stage2_prior.train", "--config", str(TINY2), f"train.output_dir={out}", f"data.codes={p['codes']}",
              "train.report_to=none"]  # fmt: skip
    return {
        "train1": [
            "-m",
            "stage1_vqvae.train",
            "--config",
            str(TINY1),
            f"train.output_dir={out}",
            f"data.source={p['images']}",
            "data.max_samples=null",
            "train.batch_size=8",
            "train.max_steps=2",
            "train.eval_every=0",
            "train.checkpoint_every=1",
            "train.report_to=none",
        ],  # fmt: skip
        "evaluate1": [
            "-m",
            "stage1_vqvae.evaluate",
            "--model",
            str(p["vqvae"]),
            "--split",
            "validation",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        "extract": [
            "-m",
            "stage1_vqvae.extract",
            "--model",
            str(p["vqvae"]),
            "--output_dir",
            str(out),
            "--batch_size",
            "4",
        ],  # fmt: skip
        "train2": [*train2, "train.max_steps=2", "train.eval_every=0", "train.checkpoint_every=1"],
        # As tests/vqgen/test_sharding.py trains under FSDP: an evaluation (its sample grid) and checkpoints.
        "train2_fsdp": [*train2, "train.max_steps=8", "train.eval_every=8", "train.checkpoint_every=4"],
        "evaluate2": [
            "-m",
            "stage2_prior.evaluate",
            "--prior",
            str(p["prior"]),
            "--split",
            "validation",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        "evaluate_samples": [
            "-m",
            "stage2_prior.evaluate_samples",
            "--pipeline",
            str(p["pipeline"]),
            "--num_samples",
            "12",
            "--batch_size",
            "4",
            "--kid_subset_size",
            "4",
            "--reference_draws",
            "1",
            "--inception_weights",
            str(p["inception"]),
            "--split",
            "test",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        "sample": [
            str(ROOT / "sample.py"),
            "--pipeline",
            str(p["pipeline"]),
            "--num_images",
            "4",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        "export": [
            "-m",
            "stage2_prior.export",
            "--vqvae",
            str(p["vqvae"]),
            "--prior",
            str(p["prior"]),
            "--output_dir",
            str(out),
        ],  # fmt: skip
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_bf16.yaml"
PROBES = ROOT / "tests" / "launch_probe", ROOT / "tests" / "fsdp_probe"  # exit checks; FSDP's gate lifted on CPUs


def run_once(name: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` in 2 CPU processes: under torchrun, or for train2_fsdp under `accelerate launch` with the shipped FSDP
    config (fp32) and Accelerate's CPU gate lifted as the tests do (tests/fsdp_probe). tests/launch_probe says in
    the output when a rank reached the interpreter's teardown."""
    fsdp = name == "train2_fsdp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", VQGEN_TEST_FSDP_ON_CPU="1",
               PYTHONPATH=os.pathsep.join(map(str, [PROBES[1] if fsdp else PROBES[0], ROOT])))  # fmt: skip
    if fsdp:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                    "--mixed_precision", "no", "--num_processes", "2", "--main_process_port",
                    str(free_port())]  # fmt: skip
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port())]  # fmt: skip
    return subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True, timeout=600)


def spin(stop) -> None:  # a CPU-bound neighbour
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--commands", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--busy", action="store_true", help="a CPU-bound process runs beside every run")
    parser.add_argument("--work", default="runs/launcher_exits")
    parser.add_argument("--log", default=None, help="append the output of every failed or warning run here")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    paths = setup(work)
    stop = multiprocessing.Event()
    neighbour = multiprocessing.Process(target=spin, args=(stop,), daemon=True) if args.busy else None
    if neighbour:
        neighbour.start()
    table = {}
    try:
        names = args.commands.split(",") if args.commands else list(commands(paths, work))
        for name in names:
            counts = {"runs": 0, "failed": 0, "aborted": 0, "warned": 0, "teardown": 0}
            t0 = time.perf_counter()
            for i in range(args.runs):
                out = work / "out" / f"{name}-{i}"
                shutil.rmtree(out, ignore_errors=True)
                proc = run_once(name, commands(paths, out)[name])
                text = proc.stdout + proc.stderr
                counts["runs"] += 1
                counts["failed"] += proc.returncode != 0
                counts["aborted"] += "terminate called" in text or "SIGABRT" in text or "Signals.SIGABRT" in text
                counts["warned"] += WARNING in text
                counts["teardown"] += "reached the interpreter's teardown" in text
                if args.log and (proc.returncode != 0 or WARNING in text):
                    with open(args.log, "a") as f:
                        f.write(f"===== {name} run {i}: exit {proc.returncode}\n{text}\n")
                shutil.rmtree(out, ignore_errors=True)
            counts["s_per_run"] = round((time.perf_counter() - t0) / max(1, counts["runs"]), 1)
            table[name] = counts
            print(name, counts, flush=True)
    finally:
        stop.set()
        if neighbour:
            neighbour.join(timeout=5)
    return table


if __name__ == "__main__":
    main()

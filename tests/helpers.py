"""Helpers shared by the test modules (plain functions; pytest puts this folder on sys.path)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY1 = os.path.join(ROOT, "configs", "tiny", "stage1.yaml")
TINY2 = os.path.join(ROOT, "configs", "tiny", "stage2.yaml")


def stage1_args(out, image_folder, *extra) -> list[str]:
    """CLI arguments for a tiny stage-1 run on the test image folder, without evaluation or trackers."""
    return [
        "--config",
        TINY1,
        f"train.output_dir={out}",
        f"data.source={image_folder}",
        "data.max_samples=null",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.report_to=none",
        *extra,
    ]


def run_two_processes(port: int, *module_args: str) -> subprocess.CompletedProcess:
    """`python -m <module> ...` in 2 CPU processes under torchrun (Accelerate on CPU, one thread each)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return subprocess.run([*cmd, "-m", *module_args], env=env, capture_output=True, text=True, timeout=300)

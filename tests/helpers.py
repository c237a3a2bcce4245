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


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed port can still be held by an earlier run's socket)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(*module_args: str) -> subprocess.CompletedProcess:
    """`python -m <module> ...` in 2 CPU processes under torchrun (Accelerate on CPU, one thread each), on a
    free port."""
    port = free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return subprocess.run([*cmd, "-m", *module_args], env=env, capture_output=True, text=True, timeout=300)


def codes_meta(codebook_size=16, height=4, width=4, class_names=("a", "b", "c"), fingerprint="f" * 64, **kw):
    """A CodesMeta for priors built in tests without extracting codes."""
    from vqgen.codes import CodesMeta

    fields = dict(
        codebook_size=codebook_size,
        height=height,
        width=width,
        image_size=16,
        channels=1,
        class_names=list(class_names) if class_names else None,
        splits={"train": 8},
        source="mnist",
        data_config={"source": "mnist", "resolution": 16},
        vqvae_fingerprint=fingerprint,
        vqvae_location=None,
        codes_fingerprint="c" * 64,
    )
    return CodesMeta(**{**fields, **kw})


def resumed_equals_uninterrupted(train, out_a, out_b, args, later_checkpoints, check=None) -> None:
    """Run `train(args)` into out_a and out_b; make out_b look like a run that died after its earliest kept
    checkpoint (later checkpoints and the final model deleted); resume it; assert both final models are equal
    bit for bit. `args(out)` gives the command line for an output folder; `check(out_b)` runs before the resume."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    full = Path(train(args(out_a)))
    train(args(out_b))
    if check is not None:
        check(Path(out_b))
    for name in later_checkpoints:
        shutil.rmtree(Path(out_b) / "checkpoints" / name)
    shutil.rmtree(Path(out_b) / "model")
    resumed = Path(train([*args(out_b), "--resume_from_checkpoint", "latest"]))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

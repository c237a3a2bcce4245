"""The FSDP checks on GPUs (NCCL, CUDA, bf16 on a GPU) with the shipped config, on a machine with 2 or more GPUs
(with one, the same checks run FSDP as a single process):

    python -m experiments.fsdp_gpu [--work runs/fsdp-gpu] [--num_processes 2]
    python -m experiments.fsdp_gpu --cpu     # the same checks on 2 CPU processes (gloo)

Accelerate (1.16) runs FSDP only on accelerators (on CPUs vqgen refuses the FSDP config in one line). With `--cpu`
the training processes lift that device gate and nothing else (tests/fsdp_probe/sitecustomize.py), so FSDP2 runs
for real on CPUs; tests/vqgen/test_sharding.py runs the same checks there in the test suite.

1. DDP and FSDP (fp32, same seed, same global batch) train the tiny prior for 6 steps: their weights must agree
   to 1e-4 (absolute, float32 reductions in another order). FSDP with the shipped config's bf16 must stay within
   0.05 of FSDP in fp32 (bf16 rounding over 6 steps at lr 3e-3).
2. FSDP killed with SIGKILL at its first checkpoint (600 steps planned), then `--resume_from_checkpoint latest`:
   the final weights must equal an uninterrupted 600-step FSDP run's bit for bit; the checkpoint must be sharded
   (pytorch_model_fsdp_0/).
3. FSDP with SIGTERM once the first checkpoint exists, under `vqgen.requeue`: exit 75, both ranks at the same step,
   a complete checkpoint, and `auto` resumes it to the end.
4. The pipelines exported from the DDP and the FSDP runs sample the same images (to 1/255).
Prints the figures and exits 1 if any check fails. On GPUs: not yet run (no GPU lent to this project so far).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from experiments.launcher_exits import setup
from vqgen.checkpoints import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
FSDP = ROOT / "configs" / "accelerate" / "fsdp_bf16.yaml"


def launch(config: list[str], out: Path, *extra: str, codes: Path, wrap=False, precision="no") -> subprocess.Popen:
    """`accelerate launch` of the tiny prior (fp32 unless `precision`: comparable across DDP and FSDP) into `out`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "--mixed_precision", precision, "-m",
           "stage2_prior.train", "--config", "configs/tiny/stage2.yaml", "--output_dir", str(out),
           f"data.codes={codes}", "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=0",
           "train.batch_size=8", "train.seed=0", *extra]  # fmt: skip
    if wrap:  # exits 75 when a rank stopped for a requeue (the launcher itself reports 1)
        cmd = [sys.executable, "-m", "vqgen.requeue", *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)


def signal_tree(proc: subprocess.Popen, sig: int, workers_only: bool = False) -> None:
    """`sig` to the launcher's training processes (and, unless `workers_only`, to the launcher and everything under
    it). The launcher starts its workers in sessions of their own: a signal to its process group misses them, and a
    SIGKILL of the launcher alone leaves them training."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in tree if "stage2_prior.train" in p.cmdline() and "-u" in p.cmdline()]
    for p in workers if workers_only else [*tree, psutil.Process(proc.pid)]:
        p.send_signal(sig)


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def newest(run: Path, timeout: float = 600) -> int:
    """The step of the run's newest complete checkpoint, once there is one."""
    end = time.time() + timeout
    while not list_checkpoints(run / "checkpoints") and time.time() < end:
        time.sleep(0.2)
    return list_checkpoints(run / "checkpoints")[-1][0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/fsdp-gpu")
    parser.add_argument("--num_processes", type=int, default=torch.cuda.device_count())
    gate = "Accelerate's FSDP device gate lifted (tests/fsdp_probe)"
    parser.add_argument("--cpu", action="store_true", help=f"run on 2 CPU processes, {gate}")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.update(ACCELERATE_USE_CPU="true", VQGEN_TEST_FSDP_ON_CPU="1", OMP_NUM_THREADS="1")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fsdp_probe"), str(ROOT)])
        args.num_processes = 2
    if args.num_processes < 1:
        print("needs a GPU: Accelerate runs FSDP only on accelerators")
        return 2
    if args.num_processes == 1:  # the FSDP code path (wrap, sharded checkpoint format, gather) without a 2nd rank
        print("one GPU: FSDP runs as one process, compared with a plain one-process run; no parameter is split")
    work = Path(args.work)
    run = functools.partial(launch, codes=setup(work / "artefacts")["codes"])
    n = ["--num_processes", str(args.num_processes)]
    ddp = ["--multi_gpu", *n] if args.num_processes > 1 else n
    fsdp = ["--config_file", str(FSDP), *n]
    results = {}

    for name, config, precision in (("ddp", ddp, "no"), ("fsdp", fsdp, "no"), ("fsdp-bf16", fsdp, "bf16")):
        assert run(config, work / name, "--overwrite_output_dir", precision=precision).wait() == 0, name
    results["fsdp equals ddp (max |dw|)"] = max_diff(weights(work / "ddp"), weights(work / "fsdp"))
    ok = {"fsdp equals ddp (max |dw|)": results["fsdp equals ddp (max |dw|)"] < 1e-4}
    # The shipped config's bf16 (parameters cast for each forward, fp32 kept in the shards): 6 steps stay near fp32.
    results["fsdp bf16 vs fp32 (max |dw|)"] = max_diff(weights(work / "fsdp"), weights(work / "fsdp-bf16"))
    ok["fsdp bf16 vs fp32 (max |dw|)"] = results["fsdp bf16 vs fp32 (max |dw|)"] < 0.05

    long = ["--overwrite_output_dir", "train.max_steps=1000000", "train.checkpoints_total_limit=2"]

    # Killed at its first checkpoint, resumed, and compared with a run never killed: all three planned for the same
    # number of steps (the learning-rate schedule follows train.max_steps).
    planned = ["train.max_steps=600", "train.checkpoints_total_limit=2"]
    killed = work / "fsdp-killed"
    proc = run(fsdp, killed, "--overwrite_output_dir", *planned)
    newest(killed)
    signal_tree(proc, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before the kill: raise train.max_steps"
    ok["checkpoint sharded"] = any(killed.glob("checkpoints/*/pytorch_model_fsdp_0"))
    assert run(fsdp, killed, "--resume_from_checkpoint", "latest", *planned).wait() == 0
    assert run(fsdp, work / "fsdp-straight", "--overwrite_output_dir", *planned).wait() == 0
    results["kill -9 + latest vs uninterrupted"] = max_diff(weights(work / "fsdp-straight"), weights(killed))
    ok["kill -9 + latest vs uninterrupted"] = results["kill -9 + latest vs uninterrupted"] == 0.0

    stopped = work / "fsdp-sigterm"
    proc = run(fsdp, stopped, *long, wrap=True)
    newest(stopped)
    signal_tree(proc, signal.SIGTERM, workers_only=True)  # as docs/slurm/vqgen.sbatch forwards a preemption
    results["sigterm exit"] = proc.wait()
    ok["sigterm exit"] = results["sigterm exit"] == 75
    resumed = run(fsdp, stopped, "--resume_from_checkpoint", "auto", f"train.max_steps={newest(stopped) + 3}")
    ok["sigterm then auto"] = resumed.wait() == 0 and (stopped / "model" / "model.safetensors").is_file()

    from stage1_vqvae.model import VQVAE
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline

    vqvae = VQVAE.from_pretrained(setup(work / "artefacts")["vqvae"])
    images = []
    for name in ("ddp", "fsdp"):
        pipe = VQGenPipeline(vqvae, load_prior(work / name / "model"))
        out = pipe(num_images=8, generator=torch.Generator().manual_seed(0), output_type="pt")
        images.append(out.images)
    results["exported pipelines' samples (max |dx|)"] = float((images[0] - images[1]).abs().max())
    ok["exported pipelines' samples"] = results["exported pipelines' samples (max |dx|)"] <= 1 / 255
    print(json.dumps({"results": results, "ok": ok}, indent=1))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

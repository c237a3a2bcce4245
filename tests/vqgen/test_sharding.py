"""FSDP as the shipped launcher config asks for it: on CPUs Accelerate (1.16) will not give FSDP and would run
unsharded in silence, so the trainer refuses in one line through the real `accelerate launch` with the shipped
config, writing nothing; the transformer-block wrap follows model.arch (GPT-2 and Llama priors, no class named in
the config), and a model it cannot wrap is one line. Then FSDP2 training itself on 2 CPU processes, with only
Accelerate's device gate lifted in the training processes (tests/fsdp_probe): equal to DDP, sharded checkpoints,
kill -9 and SIGTERM resumed bit for bit, the export (docs/cluster.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqgen.checkpoints import list_checkpoints
from vqgen.sharding import wrap_problem

from helpers import ROOT, TINY2, free_port, probe_says, tiny_prior

FSDP_CONFIG = os.path.join(ROOT, "configs", "accelerate", "fsdp_bf16.yaml")


def test_the_shipped_fsdp_config_names_no_wrap_class_so_it_follows_the_model():
    cfg = yaml.safe_load(Path(FSDP_CONFIG).read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg["fsdp_config"]


@pytest.mark.parametrize("arch,block", [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")])
def test_the_wrap_class_follows_model_arch_and_a_mismatch_is_one_line(arch, block):
    prior = tiny_prior(arch=arch)
    assert list(prior._no_split_modules) == [block]  # what Accelerate wraps when the config names no class
    assert wrap_problem(prior, None) is None and wrap_problem(prior, [block]) is None
    other = "LlamaDecoderLayer" if arch == "gpt2" else "GPT2Block"
    problem = wrap_problem(prior, [other])
    assert f"wraps {other}" in problem and block in problem and "\n" not in problem
    flat = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))  # a network without transformer blocks (stage 1's kind)
    assert "NO_WRAP" in wrap_problem(flat, None)


def test_fsdp_on_cpus_is_refused_in_one_line_before_anything_is_written(stage1, tmp_path):
    _, _, codes = stage1
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "stage2_prior.train",
           "--config", "configs/tiny/stage2.yaml", "--output_dir", str(out), f"data.codes={codes}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "Accelerate runs FSDP only on GPUs" in errors[0] and "MULTI_CPU" in errors[0]
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# FSDP training itself, on 2 CPU processes: the shipped config through `accelerate launch`, with Accelerate's
# device gate lifted in the training processes (tests/fsdp_probe/sitecustomize.py says why that is all it does).

STEPS = ["train.max_steps=40", "train.checkpoint_every=4", "train.checkpoints_total_limit=2", "train.eval_every=20",
         "model.dropout=0.1"]  # fmt: skip


def launch(codes, out: Path, config: list[str], *extra: str, requeue=False, fsdp_on_cpu=True) -> subprocess.Popen:
    """The tiny prior trained by `accelerate launch <config> --num_processes 2` into `out`, 40 steps planned."""
    probe = os.path.join(ROOT, "tests", "fsdp_probe")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([probe, ROOT]),
               VQGEN_TEST_FSDP_ON_CPU="1" if fsdp_on_cpu else "0")  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "stage2_prior.train", "--config", TINY2, "--output_dir", str(out),
           f"data.codes={codes}", *STEPS, *extra]  # fmt: skip
    if requeue:
        cmd = [sys.executable, "-m", "vqgen.requeue", *cmd]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finished(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_training(proc, signal.SIGKILL, everything=True)
        raise AssertionError(f"no exit within {timeout} s") from None
    said = probe_says(err)
    assert not said, f"a rank ended in a way that can abort it at exit: {said}"
    return proc.returncode, out, err


def training_processes(proc: subprocess.Popen) -> list:
    """The launcher's two workers, in rank order (they run in sessions of their own: a signal to the launcher's
    process group misses them)."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in tree if "stage2_prior.train" in p.cmdline() and "-u" in p.cmdline()]
    return sorted(workers, key=lambda p: int(p.environ().get("RANK", "0")))


def signal_training(proc: subprocess.Popen, sig: int, everything: bool = False, ranks=(0, 1)) -> None:
    """`sig` to the training processes of `ranks`, or to the launcher and everything under it."""
    import psutil

    if everything:
        targets = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    else:
        targets = [w for r, w in enumerate(training_processes(proc)) if r in ranks]
    for p in targets:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, after: int = 0, timeout: float = 240) -> int:
    """The step of the first complete checkpoint past `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s for s, _ in list_checkpoints(out / "checkpoints") if s > after]
        if steps:
            return steps[0]
        assert proc.poll() is None, f"the run ended ({proc.returncode}) first:\n{proc.stderr.read()[-3000:]}"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint past step {after} within {timeout} s")


def sharded_across_two_ranks(checkpoint: Path) -> None:
    """Each rank wrote its own half: every parameter of the model and every Adam moment is split in two chunks."""
    from torch.distributed.checkpoint import FileSystemReader

    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (checkpoint / part).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
        tensors = FileSystemReader(str(checkpoint / part)).read_metadata().state_dict_metadata
        big = {k: v for k, v in tensors.items() if hasattr(v, "chunks") and v.size.numel() > 1}
        assert big and all(len(v.chunks) == 2 for v in big.values()), {k: len(v.chunks) for k, v in big.items()}


def final_weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_survives_kill_9_and_sigterm_bit_for_bit(stage1, tmp_path):
    _, vqvae, codes = stage1
    fsdp32 = ["--config_file", FSDP_CONFIG, "--mixed_precision", "no"]
    ddp32 = ["--multi_gpu", "--mixed_precision", "no"]

    # FSDP (fp32) and DDP, same seed and batches: the same prior up to float32 summation order.
    code, _, err = finished(launch(codes, tmp_path / "ddp", ddp32, fsdp_on_cpu=False))
    assert code == 0, err[-3000:]
    code, _, err = finished(launch(codes, tmp_path / "fsdp32", fsdp32))
    assert code == 0, err[-3000:]
    sharded_across_two_ranks(tmp_path / "fsdp32" / "checkpoints" / "checkpoint_40")
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp32")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)

    # Killed with SIGKILL at its first checkpoint, resumed with `latest`, stopped by SIGTERM to one rank under
    # vqgen.requeue, resumed with `auto`: the uninterrupted FSDP run's weights, bit for bit. (The shipped config's
    # bf16 runs in the Llama test below.)
    out = tmp_path / "chain"
    killed = launch(codes, out, fsdp32)
    first = wait_for_checkpoint(out, killed)
    signal_training(killed, signal.SIGKILL, everything=True)
    killed.wait(60)
    assert not (out / "model").exists()
    resumed = launch(codes, out, fsdp32, "--resume_from_checkpoint", "latest", requeue=True)
    wait_for_checkpoint(out, resumed, after=first)
    signal_training(resumed, signal.SIGTERM, ranks=(1,))  # rank 0 learns at the next step's all-reduce
    code, stdout, err = finished(resumed)
    assert code == 75, err[-3000:]
    step = list_checkpoints(out / "checkpoints")[-1][0]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint_{first}'}" in err, err[-3000:]
    assert f"stopped at step {step} (SIGTERM)" in err and f"[rank 1] stopped at step {step}" in stdout, err[-3000:]
    sharded_across_two_ranks(out / "checkpoints" / f"checkpoint_{step}")
    assert not (out / "model").exists() and step < 40
    code, _, err = finished(launch(codes, out, fsdp32, "--resume_from_checkpoint", "auto"))
    assert code == 0, err[-3000:]
    a, b = final_weights(tmp_path / "fsdp32"), final_weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # The exported pipelines (full weights gathered from the shards) sample what DDP's samples.
    from stage2_prior.export import main as export
    from stage2_prior.pipeline import VQGenPipeline

    images = []
    for run in ("ddp", "fsdp32"):
        folder = export(["--vqvae", str(vqvae), "--prior", str(tmp_path / run / "model"), "--output_dir",
                         str(tmp_path / f"{run}-pipeline")])  # fmt: skip
        pipe = VQGenPipeline.from_pretrained(folder)
        images.append(pipe(num_images=16, generator=torch.Generator().manual_seed(0), output_type="pt").images)
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fsdp_wraps_a_llama_prior_with_the_same_config(stage1, tmp_path):
    # The shipped config as it is (bf16 mixed precision) and no wrap class in it: Accelerate wraps the model's own
    # LlamaDecoderLayer, shards, checkpoints and exports.
    out = tmp_path / "llama"
    code, _, err = finished(launch(stage1[2], out, ["--config_file", FSDP_CONFIG], "model.arch=llama",
                                   "train.max_steps=4", "train.eval_every=0"))  # fmt: skip
    assert code == 0, err[-3000:]
    sharded_across_two_ranks(out / "checkpoints" / "checkpoint_4")
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "llama"

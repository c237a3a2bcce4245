"""Past one machine: 2 nodes x 1 process on localhost, each node running docs/slurm/vqgen.sbatch's own per-node
command (`vqgen.requeue accelerate launch --num_machines 2 --machine_rank R ...`, gloo on CPUs), give the figures of
1 node x 2 processes for stage 1, extraction (row for row) and stage 2; and a node whose training process is
killed with SIGKILL ends the other node within a bounded time with one clear line, after which the requeued job
(the same command line, `auto`) resumes from the last complete checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from helpers import ROOT, TINY1, TINY2, free_port, run_two_processes

SBATCH = (Path(ROOT) / "docs" / "slurm" / "vqgen.sbatch").read_text()
PER_NODE = SBATCH.split("bash -c '", 1)[1].split("' &", 1)[0]  # what srun runs on every node
TRAIN1 = ["data.max_samples=null", "train.batch_size=8", "train.max_steps=4", "train.eval_every=0",
          "train.report_to=none", "train.checkpoint_every=2"]  # fmt: skip
TRAIN2 = ["train.max_steps=6", "train.eval_every=0", "train.report_to=none", "train.checkpoint_every=3"]


def start_nodes(module: str, config: str, out: Path, extra: list[str], command: str = PER_NODE) -> list:
    """Both nodes of a 2-node job on this machine, as SLURM would start them (own sessions, shared folder)."""
    port = str(free_port())
    env = dict(os.environ, MODULE=module, CONFIG=config, OUT=str(out), EXTRA=" ".join(extra), NNODES="2",
               NPROCS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LAUNCH_ARGS="--multi_gpu",
               ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)  # fmt: skip
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return [
        subprocess.Popen(["bash", "-c", command], env={**env, "SLURM_NODEID": str(rank)}, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in (0, 1)
    ]  # fmt: skip


def finish(nodes: list, timeout: float = 240) -> list[str]:
    logs = [node.communicate(timeout=timeout)[1] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    return logs


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


@pytest.mark.slow
def test_two_nodes_train_both_stages_and_extract_as_one_node_with_two_processes(stage1, image_folder, tmp_path):
    _, model_dir, codes = stage1
    s1 = [f"data.source={image_folder}", *TRAIN1]
    finish(start_nodes("stage1_vqvae.train", TINY1, tmp_path / "s1-nodes", s1))
    run_two_processes("stage1_vqvae.train", "--config", TINY1, "--output_dir", str(tmp_path / "s1-one"), *s1)
    assert_same(weights(tmp_path / "s1-nodes"), weights(tmp_path / "s1-one"))

    extract = PER_NODE.split('-m "$MODULE"')[0] + f'-m stage1_vqvae.extract --model {model_dir} --output_dir "$OUT"'
    finish(start_nodes("stage1_vqvae.extract", TINY1, tmp_path / "codes-nodes", [], command=extract))
    run_two_processes("stage1_vqvae.extract", "--model", str(model_dir), "--output_dir", str(tmp_path / "codes-one"))
    from datasets import load_from_disk

    for split in ("train", "validation", "test"):
        a = load_from_disk(str(tmp_path / "codes-nodes" / "data"))[split]
        b = load_from_disk(str(tmp_path / "codes-one" / "data"))[split]
        assert a["codes"] == b["codes"] and a["label"] == b["label"], split

    finish(start_nodes("stage2_prior.train", TINY2, tmp_path / "s2-nodes", [f"data.codes={codes}", *TRAIN2]))
    run_two_processes("stage2_prior.train", "--config", TINY2, "--output_dir", str(tmp_path / "s2-one"),
                      f"data.codes={codes}", *TRAIN2)  # fmt: skip
    assert_same(weights(tmp_path / "s2-nodes"), weights(tmp_path / "s2-one"))


def training_process(node: subprocess.Popen, module: str):
    """The node's training process (the launcher's child running `python -u -m MODULE`), once it exists."""
    for _ in range(600):
        for p in psutil.Process(node.pid).children(recursive=True):
            cmd = p.cmdline()
            if module in cmd and "-u" in cmd:
                return p
        time.sleep(0.1)
    raise AssertionError("the training process never started")


@pytest.mark.slow
def test_a_dead_node_ends_the_other_with_one_clear_line_and_the_requeued_job_resumes(stage1, tmp_path):
    _, _, codes = stage1
    out = tmp_path / "run"
    long = [f"data.codes={codes}", "train.max_steps=100000", "train.eval_every=0", "train.report_to=none",
            "train.checkpoint_every=20", "train.checkpoints_total_limit=2"]  # fmt: skip
    nodes = start_nodes("stage2_prior.train", TINY2, out, long)
    worker = training_process(nodes[1], "stage2_prior.train")
    while not list((out / "checkpoints").glob("checkpoint_*/trainer_state.json")):
        assert nodes[0].poll() is None, nodes[0].communicate()[1][-3000:]
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        log = nodes[0].communicate(timeout=120)[1]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    ended_after = time.monotonic() - killed_at
    print(f"the surviving node ended {ended_after:.2f} s after the kill")  # (pytest -s shows it)
    assert nodes[0].returncode not in (0, 75) and ended_after < 60, (nodes[0].returncode, ended_after)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with another process" in errors[0], log[-3000:]
    assert "--resume_from_checkpoint auto" in errors[0]

    complete = sorted(int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("*/trainer_state.json"))
    last = complete[-1]
    resumed = [f"data.codes={codes}", f"train.max_steps={last + 2}", "train.eval_every=0", "train.report_to=none",
               "train.checkpoint_every=20"]  # fmt: skip
    logs = finish(start_nodes("stage2_prior.train", TINY2, out, resumed))
    assert f"resumed from {out / 'checkpoints' / f'checkpoint_{last}'}" in logs[0]
    assert (out / "model" / "model.safetensors").is_file()

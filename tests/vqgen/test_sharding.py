"""FSDP as the shipped launcher config asks for it: on CPUs Accelerate (1.16) cannot give FSDP and would run
unsharded in silence, so the trainer refuses in one line through the real `accelerate launch` with the shipped
config, writing nothing; the transformer-block wrap follows model.arch (GPT-2 and Llama priors, no class named in
the config), and a model it cannot wrap is one line. The sharded training itself runs on GPUs only
(experiments/fsdp_gpu.py; docs/cluster.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vqgen.sharding import wrap_problem

from helpers import ROOT, free_port, tiny_prior

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

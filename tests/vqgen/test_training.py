"""The training plumbing: mixed precision left to the launcher, complete checkpoints only, the NaN guard."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vqgen.cli import VqgenError
from vqgen.training import STATE_FILE, NonFiniteGuard, resolve_resume

from helpers import stage1_args


def test_mixed_precision_is_left_to_accelerate_launch_unless_the_config_sets_it(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from stage2_prior.train import TrainConfig
    from vqgen.training import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    try:
        AcceleratorState._reset_state(True)
        accelerator, _ = build_accelerator(TrainConfig(report_to="none"), tmp_path)
        assert accelerator.mixed_precision == "bf16"
        AcceleratorState._reset_state(True)
        accelerator, _ = build_accelerator(TrainConfig(report_to="none", mixed_precision="no"), tmp_path)
        assert accelerator.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)


def test_a_save_killed_halfway_is_never_picked_by_latest(tmp_path, image_folder):
    from stage1_vqvae.train import main

    out = tmp_path / "run"
    main(stage1_args(out, image_folder, "train.max_steps=4", "train.checkpoint_every=2"))
    ckpts = out / "checkpoints"
    # What a kill during save_state leaves: a checkpoint folder without its state file (written last).
    shutil.copytree(ckpts / "checkpoint_4", ckpts / "checkpoint_6")
    (ckpts / "checkpoint_6" / STATE_FILE).unlink()
    (ckpts / "checkpoint_6" / "model.safetensors").write_bytes(b"truncated")
    assert resolve_resume("latest", ckpts) == ckpts / "checkpoint_4"
    main(
        stage1_args(out, image_folder, "train.max_steps=6", "train.checkpoint_every=2")
        + ["--resume_from_checkpoint", "latest"]
    )
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6
    assert (ckpts / "checkpoint_6" / STATE_FILE).is_file()  # the incomplete save was replaced by a complete one


def test_non_finite_guard_reports_the_first_non_finite_step_without_syncing_each_step():
    watch = NonFiniteGuard("Lower train.learning_rate")
    for step, value in enumerate([1.0, 0.5, float("nan"), float("inf"), 2.0], start=1):
        watch.observe(torch.tensor(value), step)
        assert isinstance(watch.first_step, torch.Tensor)  # kept on the device until checked
    with pytest.raises(VqgenError, match=r"became nan at step 3;.*Last good checkpoint: ckpt/checkpoint_2.*latest"):
        watch.check(Path("ckpt/checkpoint_2"))
    fine = NonFiniteGuard("")
    fine.observe(torch.tensor(1.0), 1)
    fine.check(None)  # finite losses: no error


def test_the_two_trainers_keep_one_skeleton_in_one_order():
    # Like accelerate's ExampleDifferenceTests: the trainers stay standalone scripts that read top to bottom, and
    # this keeps their shared skeleton from drifting apart (a step added to one loop and not the other fails).
    import ast
    import inspect

    import stage1_vqvae.train as stage1
    import stage2_prior.train as stage2

    skeleton = [
        "parse_train_args", "build_accelerator", "check_run", "open_run", "train_loaders", "prepare_run",
        "load_checkpoint", "init_trackers", "RunStats", "NonFiniteGuard", "endless_batches", "accumulate",
        "observe", "due", "check", "save_checkpoint", "wait_for_everyone", "summary", "publish", "end_training",
    ]  # fmt: skip

    def calls_in_order(module) -> list[str]:
        tree = ast.parse(inspect.getsource(module.main))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        calls.sort(key=lambda n: (n.lineno, n.col_offset))
        names = [c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "") for c in calls]
        return [n for n in names if n in skeleton]

    for module in (stage1, stage2):
        seen = calls_in_order(module)
        firsts = [seen.index(name) for name in skeleton]  # every step present ...
        assert firsts == sorted(firsts), (module.__name__, seen)  # ... and in the skeleton's order


def test_a_short_run_is_told_when_its_checkpoint_interval_or_warmup_does_not_fit(caplog):
    from vqgen.training import BaseTrainConfig, check_schedule

    with caplog.at_level("WARNING"):
        check_schedule(BaseTrainConfig(max_steps=1000, checkpoint_every=250, warmup_steps=100))
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        check_schedule(BaseTrainConfig(max_steps=200, checkpoint_every=1000, warmup_steps=500))
    assert "checkpoint only at its end" in caplog.text and "train.checkpoint_every=50" in caplog.text
    assert "never leaves warmup" in caplog.text and "0.4 of train.learning_rate" in caplog.text
    assert caplog.text.count("WARNING") == 2


def test_latest_without_a_checkpoint_names_the_flags_that_start_a_new_run(tmp_path):
    from vqgen.cli import VqgenError
    from vqgen.training import resolve_resume

    with pytest.raises(VqgenError, match="--overwrite_output_dir instead.*--resume_from_checkpoint auto"):
        resolve_resume("latest", tmp_path / "checkpoints")


def test_the_projected_wall_time_is_said_once_and_a_long_cpu_run_is_warned_about(caplog):
    from vqgen.progress import RunStats
    from vqgen.training import BaseTrainConfig

    for max_steps, warned in ((2000, False), (20000, True)):
        stats = RunStats("images", start_step=0)
        stats.clock = iter([50.0, 60.0]).__next__  # the first log at step 50 after 50 s: 1 s a step
        stats.t0 = 0.0
        caplog.clear()
        with caplog.at_level("INFO"):
            total = stats.project(50, BaseTrainConfig(max_steps=max_steps), torch.device("cpu"))
            assert stats.project(100, BaseTrainConfig(max_steps=max_steps), torch.device("cpu")) is None  # once
        assert total == max_steps and f"train.max_steps={max_steps} on cpu" in caplog.text
        assert ("which has no GPU" in caplog.text) is warned
        if warned:
            assert "5 h 33 min" in caplog.text and caplog.text.count("which has no GPU") == 1
            assert "the CPU recipe configs/own-cpu/" in caplog.text  # the way out, by name
    stats = RunStats("images", start_step=0)
    stats.clock, stats.t0 = (lambda: 50.0), 0.0
    with caplog.at_level("INFO"):
        caplog.clear()
        stats.project(50, BaseTrainConfig(max_steps=20000), torch.device("cuda"))
    assert "which has no GPU" not in caplog.text  # an accelerator: the projection only


def test_both_trainers_say_once_when_a_cpu_run_would_pass_the_threshold(tmp_path, image_folder, stage1, monkeypatch,
                                                                         caplog):  # fmt: skip
    import vqgen.progress
    from stage1_vqvae.train import main as train1

    from helpers import train2

    _, _, codes = stage1
    runs = {
        "stage 1": lambda out: train1(stage1_args(out, image_folder, "train.max_steps=4", "train.log_every=2")),
        "stage 2": lambda out: train2(out, codes, "train.max_steps=4", "train.log_every=2"),
    }
    for name, run in runs.items():
        for threshold, said in ((3600.0, 0), (1e-6, 1)):  # a 4-step tiny run: well under an hour, over 1 us
            monkeypatch.setattr(vqgen.progress, "CPU_WARN_S", threshold)
            caplog.clear()
            with caplog.at_level("INFO"):
                run(tmp_path / f"{name}-{threshold}")
            assert caplog.text.count("projected wall time for train.max_steps=4 on cpu") == 1, name
            assert caplog.text.count("which has no GPU") == said, name

"""Reliability and security: kill -9 and resume, interrupted saves, non-finite losses, bad input, secrets."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqgen.cli import VqgenError
from vqgen.files import commit_dir, safe_name
from vqgen.training import STATE_FILE, NonFiniteGuard, resolve_resume

from helpers import ROOT, TINY1, TINY2, stage1_args


def kill_after_checkpoint(cmd: list[str], env: dict, ckpts, name: str = "checkpoint_5") -> Path:
    """Start a training subprocess, SIGKILL it as soon as checkpoint `name` is complete; returns that checkpoint.

    The tests resume from it explicitly: step 5 is mid-epoch (2 batches an epoch), where a resumed run starts
    a data iterator that the uninterrupted run did not."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / name / STATE_FILE).is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpts.parent / "model").exists(), "the run finished before it could be killed"
    return ckpts / name


def assert_same_weights(folder_a, folder_b) -> None:
    a = load_file(str(folder_a / "model.safetensors"))
    b = load_file(str(folder_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, image_folder):
    # Dead-code restarts (global RNG draws) fire throughout, also in the resumed window.
    common = ["train.max_steps=300", "train.checkpoint_every=5", "train.checkpoints_total_limit=0"]
    common += ["model.dead_code_window=3", "train.eval_every=50"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stage1_vqvae.train"]
    ref = subprocess.run(cmd + stage1_args(tmp_path / "ref", image_folder, *common), env=env, capture_output=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    ckpts = tmp_path / "run" / "checkpoints"
    start = kill_after_checkpoint(cmd + stage1_args(tmp_path / "run", image_folder, *common), env, ckpts)
    assert resolve_resume("latest", ckpts) is not None

    resumed = subprocess.run(
        cmd + stage1_args(tmp_path / "run", image_folder, *common) + ["--resume_from_checkpoint", str(start)],
        env=env,
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Bitwise: model, optimizer, codebook EMA, dead-code ages, RNG and data position all restored.
    assert_same_weights(tmp_path / "ref" / "model", tmp_path / "run" / "model")


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


def test_commit_dir_replaces_a_folder_only_when_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("1")
    tmp = tmp_path / ".model.tmp"
    tmp.mkdir()
    (tmp / "new").write_text("2")
    commit_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new"] and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, image_folder):
    from stage1_vqvae.train import main

    out = tmp_path / "run"
    main(stage1_args(out, image_folder, "train.max_steps=2", "train.checkpoint_every=2"))
    good = load_file(str(out / "checkpoints" / "checkpoint_2" / "model.safetensors"))
    final_model = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(VqgenError, match=r"at step \d+.*checkpoint_2") as err:
        main(
            stage1_args(
                out,
                image_folder,
                "train.max_steps=50",
                "train.checkpoint_every=100",
                "train.log_every=1000",  # the loss is first checked at step 50, before the final save
                "train.learning_rate=1.0e+30",
            )
            + ["--resume_from_checkpoint", "latest"]
        )
    # The error names the step where the loss first stopped being finite, not the step where it was checked.
    assert 2 < int(re.search(r"at step (\d+)", str(err.value)).group(1)) < 50
    again = load_file(str(out / "checkpoints" / "checkpoint_2" / "model.safetensors"))
    assert all(torch.equal(good[k], again[k]) for k in good)
    # Nothing was saved after the non-finite loss: no new checkpoint, and model/ is still the first run's.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_2"]
    assert (out / "model" / "model.safetensors").read_bytes() == final_model


def test_an_unwritable_output_folder_is_one_clear_error(tmp_path, image_folder):
    from stage1_vqvae.train import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(VqgenError, match="cannot write to output_dir"):
        main(stage1_args(tmp_path / "a_file" / "run", image_folder, "train.max_steps=1"))
    with pytest.raises(VqgenError, match="is a file"):
        main(stage1_args(tmp_path / "a_file", image_folder, "train.max_steps=1"))


def test_images_smaller_than_the_downsampling_are_resized_up(tmp_path):
    import numpy as np
    from PIL import Image

    from stage1_vqvae.data import DataConfig, ImageSplit, load_source

    for split in ("train", "validation", "test"):
        d = tmp_path / "imgs" / split / "x"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((2, 3), 50 * i, np.uint8)).save(d / f"{i}.png")
    cfg = DataConfig(source=str(tmp_path / "imgs"), resolution=16)
    split = ImageSplit(load_source(cfg)["train"], cfg)
    assert split.images.shape[1:] == (1, 16, 16)


def test_hub_token_never_reaches_logs_configs_or_cards(tmp_path, image_folder, monkeypatch, fake_hub):
    from stage1_vqvae.train import main

    secret = "hf_SECRETtokenVALUE1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)

    out = tmp_path / "run"
    main(
        [
            "--config",
            TINY1,
            f"train.output_dir={out}",
            f"data.source={image_folder}",
            "data.max_samples=null",
            "train.batch_size=8",
            "train.max_steps=2",
            "train.report_to=tensorboard",
            "--push_to_hub",
            "--hub_model_id",
            "me/vq",
        ]
    )
    assert any((tmp_path / "remote").rglob("model.safetensors"))  # the push did happen
    for root in (out, tmp_path / "remote"):
        for p in root.rglob("*"):
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p


def test_names_that_reach_paths_cannot_escape():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in safe_name("a/b\\c") and safe_name("..") == "unnamed"
    assert safe_name("seven") == "seven"


def test_a_folder_where_an_image_is_expected(tmp_path):
    from types import SimpleNamespace

    from sample import completion_prefix

    with pytest.raises(VqgenError, match="pass one image file"):
        completion_prefix(SimpleNamespace(complete=str(tmp_path), keep_rows=None), None, 1)


@pytest.mark.slow
def test_prior_kill_9_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, image_folder, tiny_model):
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.extract import extract

    codes = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="none"
    )
    common = ["train.max_steps=200", "train.checkpoint_every=5", "train.eval_every=50", f"data.codes={codes}"]
    common += ["train.checkpoints_total_limit=0"]
    common += ["model.dropout=0.1"]  # dropout draws from the global RNG at every step, also after the resume
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stage2_prior.train", "--config", TINY2]
    ref = subprocess.run(cmd + [f"train.output_dir={tmp_path / 'ref'}", *common], env=env, capture_output=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = [f"train.output_dir={tmp_path / 'run'}", *common]
    start = kill_after_checkpoint(cmd + run, env, tmp_path / "run" / "checkpoints")
    resumed = subprocess.run(
        cmd + [f"train.output_dir={tmp_path / 'run'}", *common, "--resume_from_checkpoint", str(start)],
        env=env,
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Class dropout is keyed by the micro-batch index, so it replays exactly too.
    assert_same_weights(tmp_path / "ref" / "model", tmp_path / "run" / "model")


def test_an_empty_split_is_one_clear_error(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    from stage1_vqvae.data import DataConfig, load_source

    img = Image.fromarray(np.zeros((4, 4), np.uint8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": [img] * 4, "label": [0] * 4}, features=features),
            "test": datasets.Dataset.from_dict({"image": [], "label": []}, features=features),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(VqgenError, match="split 'test' is empty"):
        load_source(DataConfig(source=str(tmp_path / "dd"), resolution=4))


def test_codes_that_do_not_match_their_metadata_are_refused(tmp_path, image_folder, tiny_model):
    from stage1_vqvae.data import DataConfig
    from stage1_vqvae.extract import extract
    from stage2_prior.data import CodeDataConfig, load_code_splits

    codes = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="none"
    )
    meta = json.loads((codes / "vqgen_codes.json").read_text())
    import datasets
    import numpy as np

    top = int(np.max(datasets.load_from_disk(str(codes / "data"))["train"].with_format("numpy")[:]["codes"]))
    meta["codebook_size"] = top  # the stored codes reach `top`, outside [0, top)
    (codes / "vqgen_codes.json").write_text(json.dumps(meta))
    with pytest.raises(VqgenError, match="outside"):
        load_code_splits(CodeDataConfig(codes=str(codes)))
    meta["codebook_size"], meta["height"], meta["width"] = 16, 8, 8
    (codes / "vqgen_codes.json").write_text(json.dumps(meta))
    with pytest.raises(VqgenError, match="grids but its metadata says"):
        load_code_splits(CodeDataConfig(codes=str(codes)))


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

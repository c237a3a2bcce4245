"""Stage-1 training: config validation, resume that reproduces an uninterrupted run, two processes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stage1_vqvae.train import main
from vqgen.cli import VqgenError

from helpers import TINY1, run_two_processes, stage1_args


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_unknown_keys_and_wrong_types_are_rejected(tmp_path):
    with pytest.raises(VqgenError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        main(["--config", TINY1, "train.lerning_rate=0.1", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="train.max_steps: expected an integer"):
        main(["--config", TINY1, "train.max_steps=ten", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="codebook_size"):
        main(["--config", TINY1, "model.codebook_size=1", f"train.output_dir={tmp_path}"])
    with pytest.raises(VqgenError, match="does not exist"):
        main(["--config", str(tmp_path / "nope.yaml")])


def test_training_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path, image_folder):
    from stage1_vqvae.model import VQVAE

    out = tmp_path / "run"
    model_dir = main(stage1_args(out, image_folder, "train.max_steps=6", "train.checkpoint_every=3"))
    model = VQVAE.from_pretrained(model_dir)
    assert model.config.image_size == 16 and model.config.codebook_size == 16
    assert (model_dir / "data_config.json").is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_3", "checkpoint_6"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6
    with pytest.raises(VqgenError, match="already holds a run"):
        main(stage1_args(out, image_folder, "train.max_steps=6"))


def test_resume_continues_the_step_count_and_reproduces_the_uninterrupted_run(tmp_path, image_folder):
    # 22 training images, batch 8 -> 2 batches an epoch: 7 steps cross epochs and resume mid-epoch.
    common = ["train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]
    full = main(stage1_args(tmp_path / "a", image_folder, *common))
    main(stage1_args(tmp_path / "b", image_folder, *common))
    # Simulate a run that died after step 3: drop the later checkpoints and the final model.
    for name in ("checkpoint_6", "checkpoint_7"):
        import shutil

        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = main(stage1_args(tmp_path / "b", image_folder, *common) + ["--resume_from_checkpoint", "latest"])
    a, b = weights(full), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps"] == 7


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, image_folder):
    # k-means init clusters the encoder outputs of both ranks (gathered), as one process clusters its batch.
    args = ["train.max_steps=4", "train.checkpoint_every=0", "model.dead_code_window=0", "model.kmeans_init=true"]
    args += ["data.validation_fraction=0.125"]  # 3 validation images: 2 ranks pad them to 4
    one = main(stage1_args(tmp_path / "one", image_folder, *args))
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(tmp_path / "two", image_folder, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["codebook_max_abs_diff_across_ranks"] == 0.0
    assert summary["validation"]["num_images"] == 3  # each image once, not the padded 4
    one_summary = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    assert summary["validation"]["psnr"] == pytest.approx(one_summary["validation"]["psnr"], abs=0.05)
    proc = run_two_processes(
        "stage1_vqvae.evaluate", "--model", str(tmp_path / "two" / "model"), "--split", "validation"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"num_images": 3') == 1  # scored once over both shards, printed once
    a, b = weights(one), weights(tmp_path / "two" / "model")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_resume_is_bit_exact_when_dead_code_restarts_fire_in_the_resumed_window(tmp_path, image_folder):
    # dead_code_window=2 with K=16 on 22 images: restarts fire at most steps, before and after the resume.
    common = ["train.max_steps=7", "train.checkpoint_every=3", "train.checkpoints_total_limit=5"]
    common += ["model.dead_code_window=2", "train.eval_every=3"]
    full = main(stage1_args(tmp_path / "a", image_folder, *common))
    main(stage1_args(tmp_path / "b", image_folder, *common))
    for name in ("checkpoint_6", "checkpoint_7"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = main(stage1_args(tmp_path / "b", image_folder, *common) + ["--resume_from_checkpoint", "latest"])
    a, b = weights(full), weights(resumed)
    restarted = a["quantizer.code_age"].max() < 7  # ages were reset by restarts (K=16 codes, few used)
    assert restarted
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_hold_the_same_quantizer_with_a_projected_cosine_lookup(tmp_path, image_folder):
    # EMA statistics, k-means init and dead-code restarts all happen in the projected, normalised space.
    args = ["train.max_steps=4", "train.checkpoint_every=0", "model.lookup_dim=4", "model.l2_normalize=true"]
    args += ["model.kmeans_init=true", "model.dead_code_window=2"]
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(tmp_path / "two", image_folder, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["codebook_max_abs_diff_across_ranks"] == 0.0

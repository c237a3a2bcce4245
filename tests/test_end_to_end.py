"""End to end and multi-process (slow): the whole chain, two processes, kill -9 and resume, Hub-ready cards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image
from safetensors.torch import load_file

from stage1_vqvae.data import DataConfig
from stage1_vqvae.extract import extract, publish_codes
from stage1_vqvae.train import main
from vqgen.cli import VqgenError
from vqgen.codes import load_code_dataset
from vqgen.training import STATE_FILE, resolve_resume

from helpers import (
    ROOT,
    TINY2,
    VQGAN_ARGS,
    assert_one_error_line,
    make_tar_shards,
    run_cli_process,
    run_two_processes,
    sample_metrics_args,
    stage1_args,
    train2,
    weights,
)

pytestmark = pytest.mark.slow  # every test here runs the whole chain or several processes


def test_evaluate_export_and_sample_end_to_end(stage1, tmp_path):
    from sample import main as sample
    from stage2_prior.evaluate import main as evaluate
    from stage2_prior.export import main as export
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=3", "train.checkpoint_every=0")
    r = evaluate(["--prior", str(prior), "--split", "test", "--output_dir", str(tmp_path / "m")])
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == r
    assert r["uniform_bits_per_code"] == 4.0 and 0 < r["bits_per_code"] < 6
    assert r["two_stage"]["num_images"] == 8 and r["two_stage"]["bits_per_dim"] > 0
    pipe = export(["--vqvae", str(vqvae_dir), "--prior", str(prior), "--output_dir", str(tmp_path / "pipe")])
    assert VQGenPipeline.from_pretrained(pipe).class_names == ["a", "b"]

    out = sample(["--pipeline", str(pipe), "--per_class", "3", "--seed", "5", "--output_dir", str(tmp_path / "o1")])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i:05d}_class{c}.png" for i, c in enumerate("aaabbb")] + ["grid.png", "samples.json"])
    info = json.loads((out / "samples.json").read_text())
    assert info["seed"] == 5 and info["classes"] == [0, 0, 0, 1, 1, 1] and len(info["vqvae_fingerprint"]) == 64
    again = sample(
        [
            "--vqvae",
            str(vqvae_dir),
            "--prior",
            str(prior),
            "--per_class",
            "3",
            "--seed",
            "5",
            "--output_dir",
            str(tmp_path / "o2"),
        ]
    )
    for n in names:
        if n.endswith(".png"):
            assert (out / n).read_bytes() == (again / n).read_bytes(), n  # same seed, same images
    # ... for the same decoding, window and batch size, which samples.json records with the rule.
    assert info["decoding"] == "sequential" and info["jacobi_window"] is None  # --batch_size 100
    assert "decoding, jacobi_window, batch_size and device" in info["same_images_with"]
    one = sample(["--pipeline", str(pipe), "--per_class", "3", "--seed", "5", "--batch_size", "1",
                  "--output_dir", str(tmp_path / "o1b")])  # fmt: skip
    one_info = json.loads((one / "samples.json").read_text())
    assert one_info["decoding"] == "jacobi" and one_info["jacobi_window"] == 8
    guided = sample(
        ["--pipeline", str(pipe), "--classes", "b,a,1", "--guidance_scale", "3", "--output_dir", str(tmp_path / "o3")]
    )
    assert json.loads((guided / "samples.json").read_text())["classes"] == [1, 0, 1]
    unc = sample(["--pipeline", str(pipe), "--num_images", "4", "--output_dir", str(tmp_path / "o4")])
    assert sorted(p.name for p in unc.glob("0*.png")) == [f"{i:05d}.png" for i in range(4)]
    comp = sample(
        [
            "--pipeline",
            str(pipe),
            "--complete",
            str(out / "00000_classa.png"),
            "--keep_rows",
            "2",
            "--num_images",
            "3",
            "--output_dir",
            str(tmp_path / "o5"),
        ]
    )
    assert (comp / "completion.png").is_file()
    # samples.json describes the completions, not the reconstruction drawn after them (temperature 0, 1 image).
    comp_info = json.loads((comp / "samples.json").read_text())
    assert comp_info["sampling"]["temperature"] != 0 and comp_info["model_forwards"] == 16 - 2 * 4
    half = sample(  # no --keep_rows: half of the code rows are kept
        ["--pipeline", str(pipe), "--complete", str(out / "00000_classa.png"), "--num_images", "2", "--seed", "3",
         "--output_dir", str(tmp_path / "o5b")]
    )  # fmt: skip
    assert (half / "completion.png").is_file()
    from types import SimpleNamespace

    from sample import completion_prefix

    loaded = VQGenPipeline.from_pretrained(pipe)
    own, prefix = completion_prefix(SimpleNamespace(complete=str(out / "00000_classa.png"), keep_rows=None), loaded, 2)
    assert prefix.shape == (2, 2 * 4) and torch.equal(prefix[0], own.reshape(-1)[:8])  # 2 of the 4 code rows
    # The per-class grid carries the class names in a left margin: wider than the bare grid of 3 images.
    from PIL import Image

    assert Image.open(out / "grid.png").width > 3 * 16 + 4 * 2

    with pytest.raises(VqgenError, match="already holds files"):
        sample(["--pipeline", str(pipe), "--output_dir", str(out)])
    with pytest.raises(VqgenError, match="not a class"):
        sample(["--pipeline", str(pipe), "--classes", "zebra", "--output_dir", str(tmp_path / "o6")])
    with pytest.raises(VqgenError, match="no such folder"):
        sample(["--vqvae", str(tmp_path / "missing"), "--prior", str(prior), "--output_dir", str(tmp_path / "o7")])
    with pytest.raises(VqgenError, match="Hub could not be reached"):
        sample(["--pipeline", "nobody/no-pipeline", "--output_dir", str(tmp_path / "o8")])


def test_two_processes_match_one_process(stage1, tmp_path, image_folder):
    from stage1_vqvae.model import VQVAE

    _, vqvae_dir, _ = stage1
    # 3 validation sequences: 2 ranks pad them to 4, and validation must count each once.
    data = DataConfig(source=str(image_folder), resolution=16, resize_mode="stretch", validation_fraction=0.125)
    codes = extract(VQVAE.from_pretrained(vqvae_dir), data, tmp_path / "codes", model_location=str(vqvae_dir))
    # Sample grids on: every rank samples (as FSDP needs), the main process writes the grid.
    args = ["train.max_steps=3", "train.checkpoint_every=0", "model.class_dropout=0.0"]
    one = train2(tmp_path / "one", codes, *args)
    proc = run_two_processes(
        "stage2_prior.train",
        "--config",
        TINY2,
        f"train.output_dir={tmp_path / 'two'}",
        f"data.codes={codes}",
        *args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["num_processes"] == 2
    assert (tmp_path / "two" / "model" / "samples.png").is_file()
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["validation"]["num_sequences"] == 3
    a, b = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


@pytest.mark.parametrize("network", [[], VQGAN_ARGS], ids=["paper", "vqgan"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, image_folder, network):
    # k-means init clusters the encoder outputs of both ranks (gathered), as one process clusters its batch.
    args = ["train.max_steps=4", "train.checkpoint_every=0", "model.dead_code_window=0", "model.kmeans_init=true"]
    args += network
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
    # An attention's key bias adds q.b_k to every score of a row, which the softmax cancels: its gradient is 0 up
    # to rounding, and Adam scales that rounding noise to full steps, so no two summation orders agree on it.
    for k in (k for k in a if not k.endswith("to_k.bias")):
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_two_processes_hold_the_same_quantizer_with_a_projected_cosine_lookup(tmp_path, image_folder):
    # EMA statistics, k-means init and dead-code restarts all happen in the projected, normalised space.
    args = ["train.max_steps=4", "train.checkpoint_every=0", "model.lookup_dim=4", "model.l2_normalize=true"]
    args += ["model.kmeans_init=true", "model.dead_code_window=2"]
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(tmp_path / "two", image_folder, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["codebook_max_abs_diff_across_ranks"] == 0.0


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


def test_a_streamed_run_on_two_processes_resumes_every_rank_where_it_was(tmp_path):
    # Audit 3, S4-3: accelerate saves registered objects from the main process only, so every rank resumed from
    # rank 0's stream position (weights off by 5.6e-3). Each rank now saves its own; the resumed run must equal
    # the uninterrupted one bit for bit (shuffle buffer 1: the stream continues row for row).
    source = make_tar_shards(tmp_path / "wds", n_shards=4, per_shard=24)
    args = [
        "data.streaming=true",
        "data.shuffle_buffer=1",
        "data.streaming_holdout=4",
        "data.validation_fraction=0.2",
        "data.test_fraction=0.2",
        "train.max_steps=7",
        "train.checkpoint_every=3",
        "train.checkpoints_total_limit=5",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(a, source, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {p.name for p in (a / "checkpoints" / "checkpoint_3").iterdir()}
    assert {"stream_state_0.pt", "stream_state_1.pt"} <= saved
    shutil.copytree(a, b)
    for name in ("checkpoint_6", "checkpoint_7"):
        shutil.rmtree(b / "checkpoints" / name)
    shutil.rmtree(b / "model")
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(b, source, *args), "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(a / "model", b / "model")


def test_two_process_extraction_gives_one_dataset_in_the_original_order(tiny_model, image_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "vq")
    data = {"source": str(image_folder), "resolution": 16}
    (tmp_path / "vq" / "data_config.json").write_text(json.dumps(data))
    proc = run_two_processes(
        "stage1_vqvae.extract",
        "--model",
        str(tmp_path / "vq"),
        "--output_dir",
        str(tmp_path / "two"),
        "--batch_size",
        "3",
        "--shard_rows",
        "4",  # several shards per split, dealt to both ranks in turn
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = extract(tiny_model, DataConfig(**data), tmp_path / "one", model_location="x")
    a, _ = load_code_dataset(one)
    b, meta = load_code_dataset(tmp_path / "two")
    for split in a:
        assert a[split]["codes"] == b[split]["codes"] and a[split]["label"] == b[split]["label"], split
    assert meta.splits == {k: len(v) for k, v in a.items()}
    assert meta.codes_fingerprint == load_code_dataset(one)[1].codes_fingerprint


@pytest.mark.parametrize("command", ["evaluate_prior", "sample", "export"])
def test_commands_end_their_process_group_on_every_rank_under_torchrun(command, stage1, pipeline_dir, tmp_path):
    # Issue 36: every rank of every command destroys its process group (run_two_processes fails the test when
    # one exits with it alive) and exits 0. The trainers, stage-1 evaluation, extraction and evaluate_samples
    # are checked the same way by their own two-process tests; these three have none of their own.
    _, vqvae_dir, _ = stage1
    prior, out = pipeline_dir / "prior", tmp_path / "out"
    argv = {
        "evaluate_prior": ["stage2_prior.evaluate", "--prior", str(prior), "--split", "validation"],
        "sample": [str(pipeline_dir), "--num_images", "4"],
        "export": ["stage2_prior.export", "--vqvae", str(vqvae_dir), "--prior", str(prior)],
    }[command]
    script = os.path.join(ROOT, "sample.py") if command == "sample" else None
    if script:
        argv = ["--pipeline", *argv]
    proc = run_two_processes(*argv, "--output_dir", str(out), script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"evaluate_prior": "metrics.json", "sample": "samples.json", "export": "pipeline.json"}[command]
    assert (out / expected).is_file()
    # The main process alone writes and says so: on CPUs a bare PartialState() ignored ACCELERATE_USE_CPU, so both
    # ranks came up as a lone main process and both wrote.
    said = {"evaluate_prior": '"bits_per_code"', "sample": "wrote 4 images", "export": "saved the pipeline"}[command]
    assert proc.stdout.count(said) == 1, proc.stdout
    assert "process group was not destroyed" not in proc.stderr


def test_import_and_diffusers_export_under_torchrun_write_one_folder_from_the_main_process(tmp_path):
    # Two ranks writing one folder raced (issue 36's export finding): both commands check on every rank and write
    # on the main process alone.
    from diffusers import VQModel

    torch.manual_seed(0)
    VQModel(in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=1, latent_channels=8,
            num_vq_embeddings=16, norm_num_groups=8, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(tmp_path / "vq")  # fmt: skip
    args = [str(tmp_path / "vq"), "--pixel_range=-1,1", "--output_dir", str(tmp_path / "s1")]
    proc = run_two_processes("stage1_vqvae.import_tokenizer", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s1" / "tokenizer_source.json").is_file() and proc.stdout.count("imported ") == 1
    proc = run_two_processes("stage1_vqvae.export_diffusers", "--model", str(tmp_path / "s1"), "--output_dir",
                             str(tmp_path / "vq2"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert VQModel.from_pretrained(tmp_path / "vq2").config.num_vq_embeddings == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1", "vq", "vq2"]  # no temporary folder left


def test_a_failing_command_ends_its_process_group_too(pipeline_dir, inception_weights, tmp_path):
    # The error path, after the group has started: each rank stops with the error line, and no rank leaves its
    # group to the teardown (where the abort showed most: `terminate called without an active exception`).
    args = sample_metrics_args(pipeline_dir, inception_weights, 4, 9, "--output_dir", str(tmp_path))
    proc = run_two_processes("stage2_prior.evaluate_samples", *args)
    assert proc.returncode != 0 and "error: KID draws subsets of 9 images" in proc.stderr
    assert "terminate called" not in proc.stderr


def test_two_processes_into_a_used_folder_say_so_once_and_stop(tmp_path, image_folder):
    from stage1_vqvae.train import main

    main(stage1_args(tmp_path / "run", image_folder, "train.max_steps=1"))
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(tmp_path / "run", image_folder))
    assert proc.returncode != 0  # the launcher's own code; each process exits 2
    assert proc.stderr.count("already holds a run") == 1


def test_pushes_without_a_network_end_in_one_line_and_leave_no_temp_folders(tmp_path, image_folder, tiny_model):
    tiny_model.data_config = {"source": str(image_folder), "resolution": 16}
    tiny_model.save_pretrained(tmp_path / "vq")
    proc = run_cli_process(
        "stage1_vqvae.extract", "--model", str(tmp_path / "vq"), "--output_dir", str(tmp_path / "codes"),
        "--push_to_hub", "--hub_dataset_id", "me/codes",
    )  # fmt: skip
    assert_one_error_line(proc, "could not push", "run the same command again")
    assert (tmp_path / "codes" / "vqgen_codes.json").is_file()  # the local copy is complete
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    proc = run_cli_process(
        "stage1_vqvae.train", *stage1_args(tmp_path / "run", image_folder, "train.max_steps=2"),
        "--push_to_hub", "--hub_model_id", "me/vq",
    )  # fmt: skip
    assert_one_error_line(proc, "could not push", "hf upload me/vq")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train_summary.json").is_file()  # written before the push


def assert_hub_ready(card_text: str, tmp_path, image_dir=None):
    """Parses as a card, no local path, no placeholder, and the image it shows exists and is not a thumbnail."""
    assert str(tmp_path) not in card_text and "/tmp/" not in card_text
    for placeholder in ("THIS_REPO", "path/to", "REPO_ID", "FOLDER_OR_REPO"):
        assert placeholder not in card_text, placeholder
    if image_dir is not None and "](samples.png)" in card_text or "](reconstructions.png)" in card_text:
        name = "samples.png" if "](samples.png)" in card_text else "reconstructions.png"
        assert Image.open(image_dir / name).width >= 200  # 16-px images are shown at 112 px or more


def test_cards_are_hub_ready(tmp_path, image_folder, fake_hub):
    from stage1_vqvae.model import VQVAE
    from stage1_vqvae.train import main as train1
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline
    from stage2_prior.train import main as train2

    vq = train1(
        stage1_args(tmp_path / "s1", image_folder, "train.max_steps=2", "--push_to_hub", "--hub_model_id", "me/vq")
    )
    codes = extract(VQVAE.from_pretrained(vq), DataConfig(source=str(image_folder), resolution=16), tmp_path / "c",
                    model_location="me/vq")  # fmt: skip
    prior = train2(["--config", TINY2, "--output_dir", str(tmp_path / "s2"), f"data.codes={codes}",
                    "train.max_steps=2", "--push_to_hub", "--hub_model_id", "me/prior"])  # fmt: skip

    publish_codes(codes, "me/codes")
    VQGenPipeline(VQVAE.from_pretrained(vq), load_prior(prior)).push_to_hub("me/pipe")
    remote = tmp_path / "remote"
    for repo in ("model/me/vq", "model/me/prior", "model/me/pipe"):
        card = ModelCard.load(remote / repo / "README.md")
        assert card.data.license == "apache-2.0" and card.data.pipeline_tag in (
            "unconditional-image-generation",
            "image-feature-extraction",
        ), repo
        assert repo.split("/", 1)[1] in card.text or repo.endswith("prior"), repo  # usage names the repo
        assert_hub_ready(card.content, tmp_path, remote / repo)
    assert "me/vq" in (remote / "model/me/vq/README.md").read_text()
    dataset_card = DatasetCard.load(remote / "dataset/me/codes/README.md")
    assert dataset_card.data.source_datasets is None  # a local folder is not a Hub dataset id
    assert_hub_ready(dataset_card.content, tmp_path)

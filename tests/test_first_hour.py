"""A user's first hour: retries after a failed start, one clear line for every failure, Hub-ready artefacts."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image

from stage1_vqvae.data import DataConfig
from stage1_vqvae.extract import extract
from vqgen.cli import VqgenError

from helpers import ROOT, TINY2, run_two_processes, stage1_args


def run_cli_process(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, cwd=ROOT)


def assert_one_error_line(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_a_failed_start_leaves_nothing_and_the_same_command_trains_once_the_data_is_fixed(tmp_path, image_folder):
    from stage1_vqvae.train import main

    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    good = data / "train" / "a" / "000.png"
    saved = good.read_bytes()
    good.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    args = stage1_args(tmp_path / "run", data, "train.max_steps=2")
    with pytest.raises(VqgenError, match="000.png"):
        main(args)
    assert not (tmp_path / "run").exists()  # nothing written: no config.yaml to block the retry
    good.write_bytes(saved)
    assert (main(args) / "model.safetensors").is_file()


def test_resuming_with_no_checkpoint_is_an_error_not_a_silent_fresh_start(tmp_path, image_folder):
    from stage1_vqvae.train import main

    with pytest.raises(VqgenError, match="holds no complete checkpoint"):
        main(stage1_args(tmp_path / "run", image_folder) + ["--resume_from_checkpoint", "latest"])


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


def test_a_failed_code_push_is_retried_without_extracting_again(tmp_path, image_folder, tiny_model, fake_hub):
    from stage1_vqvae.extract import main

    tiny_model.data_config = {"source": str(image_folder), "resolution": 16}
    tiny_model.save_pretrained(tmp_path / "vq")
    args = ["--model", str(tmp_path / "vq"), "--output_dir", str(tmp_path / "codes")]
    args += ["--push_to_hub", "--hub_dataset_id", "me/codes"]
    real = fake_hub.create_repo

    def down(self, *a, **kw):
        raise ConnectionError("no route to host")

    fake_hub.create_repo = down
    with pytest.raises(VqgenError, match="could not push"):
        main(args)
    made = (tmp_path / "codes" / "vqgen_codes.json").stat().st_mtime_ns
    fake_hub.create_repo = real
    main(args)
    assert (tmp_path / "codes" / "vqgen_codes.json").stat().st_mtime_ns == made  # not extracted again
    assert (tmp_path / "remote" / "dataset" / "me" / "codes" / "vqgen_codes.json").is_file()


def test_bad_extraction_inputs_are_one_clear_error_and_leave_nothing(tmp_path, tiny_model, image_folder):
    for split in ("train", "validation", "test"):
        junk = tmp_path / "junk" / split / "a"
        junk.mkdir(parents=True)
        for i in range(2):
            (junk / f"{i}.png").write_bytes(b"not an image at all")
    with pytest.raises(VqgenError, match=r"cannot decode the image.*Remove or replace"):
        extract(
            tiny_model, DataConfig(source=str(tmp_path / "junk"), resolution=16), tmp_path / "c1", model_location="x"
        )
    with pytest.raises(VqgenError, match=r"16x16 images.*data.resolution=16"):
        extract(tiny_model, DataConfig(source=str(image_folder), resolution=32), tmp_path / "c2", model_location="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # no .work or temp folders


def test_device_cuda_without_a_gpu_is_one_clear_error(tmp_path, monkeypatch):
    from sample import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VqgenError, match="no CUDA GPU"):
        main(["--pipeline", str(tmp_path), "--device", "cuda", "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_two_processes_into_a_used_folder_say_so_once_and_stop(tmp_path, image_folder):
    from stage1_vqvae.train import main

    main(stage1_args(tmp_path / "run", image_folder, "train.max_steps=1"))
    proc = run_two_processes("stage1_vqvae.train", *stage1_args(tmp_path / "run", image_folder))
    assert proc.returncode != 0  # the launcher's own code; each process exits 2
    assert proc.stderr.count("already holds a run") == 1


def test_colour_images_under_channels_l_are_said_to_become_gray(caplog):
    from stage1_vqvae.data import ImageTransform

    transform = ImageTransform(DataConfig(resolution=4, channels="L"))
    with caplog.at_level("WARNING"):
        transform(Image.new("RGB", (4, 4), (200, 10, 10)))
        transform(Image.new("RGB", (4, 4), (200, 10, 10)))
    assert caplog.text.count("data.channels=RGB") == 1


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
    from stage1_vqvae.extract import publish_codes

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

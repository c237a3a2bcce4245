"""VQGenPipeline and sample.py: sampling, save/load/push, mismatches refused, one-line errors."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vqgen.cli import VqgenError

from helpers import (
    ROOT,
    train2,
)


def test_sampling_with_a_mismatching_vqvae_fails_clearly(stage1, tmp_path, tiny_model):
    from sample import main as sample

    _, _, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=1", "train.checkpoint_every=0")
    tiny_model.save_pretrained(tmp_path / "other_vqvae")
    with pytest.raises(VqgenError, match="fingerprints differ"):
        sample(["--vqvae", str(tmp_path / "other_vqvae"), "--prior", str(prior), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_the_pipeline_object_samples_saves_loads_and_pushes(stage1, tmp_path, fake_hub, caplog):

    from stage1_vqvae.model import VQVAE
    from stage2_prior.model import load_prior
    from stage2_prior.pipeline import VQGenPipeline

    _, vqvae_dir, codes = stage1
    prior = train2(tmp_path / "s2", codes, "train.max_steps=2", "train.checkpoint_every=0")
    pipe = VQGenPipeline(VQVAE.from_pretrained(vqvae_dir), load_prior(prior))
    out = pipe(classes=["a", 1, "b"], generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(16, 16)] * 3 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.classes.tolist() == [0, 1, 1] and out.codes.shape == (3, 4, 4)
    pt = pipe(classes=["a", 1, "b"], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert pt.images.shape == (3, 1, 16, 16) and 0 <= pt.images.min() and pt.images.max() <= 1
    assert torch.equal(pt.codes, out.codes)  # same seed, same samples
    pil_pixels = torch.tensor([list(im.getdata()) for im in out.images]).view(3, 1, 16, 16)
    assert torch.equal(pil_pixels, pt.images.mul(255).round().byte())
    with caplog.at_level("WARNING"):
        assert pipe(num_images=2, guidance_scale=3.0, output_type="pt").images.shape[0] == 2
    assert "ignored" in caplog.text  # guidance needs a class: said, not silently dropped

    folder = pipe.save_pretrained(tmp_path / "pipe")
    assert {"vqvae", "prior", "pipeline.json", "README.md", "samples.png"} <= {p.name for p in folder.iterdir()}
    assert (folder / "vqvae" / "data_config.json").is_file()
    again = VQGenPipeline.from_pretrained(folder)
    assert torch.equal(again(classes=[0, 1, 1], generator=torch.Generator().manual_seed(0)).codes, out.codes)
    pipe.push_to_hub("me/pipe", api=fake_hub())
    remote = tmp_path / "remote" / "model" / "me" / "pipe"
    assert "me/pipe" in (remote / "README.md").read_text()
    assert VQGenPipeline.from_pretrained(remote).vqvae_fingerprint == pipe.vqvae_fingerprint

    # A failed push names a folder that still exists: the caller's copy, or how to make one (not the temp folder).
    api = fake_hub()

    def down(*a, **kw):
        raise ConnectionError("no route to host")

    api.create_repo = down
    with pytest.raises(VqgenError, match=r"ConnectionError: no route to host.*save_pretrained\(FOLDER\)"):
        pipe.push_to_hub("me/pipe", api=api)
    with pytest.raises(VqgenError, match=f"local copy in {folder} is complete.*hf upload me/pipe {folder}"):
        pipe.push_to_hub("me/pipe", api=api, local_copy=folder)


@pytest.mark.slow  # subprocesses or a compilation: seconds each
def test_cli_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            "--pipeline",
            str(tmp_path / "nope"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_device_cuda_without_a_gpu_is_one_clear_error(tmp_path, monkeypatch):
    from sample import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VqgenError, match="no CUDA GPU"):
        main(["--pipeline", str(tmp_path), "--device", "cuda", "--output_dir", str(tmp_path / "o")])

"""Stage-2 evaluation: the bits/dim bounds."""

import shutil

import pytest
import torch

from stage1_vqvae.data import DataConfig
from stage1_vqvae.extract import extract
from stage2_prior.model import (
    TokenLayout,
)

from helpers import tiny_prior, train2


def test_uniform_prior_bound_equals_the_stage1_bound(tiny_model, image_folder):
    from stage1_vqvae.data import DataConfig, ImageSplit
    from stage1_vqvae.evaluate import full_evaluation
    from stage1_vqvae.sources import load_source
    from stage2_prior.evaluate import two_stage_bits_per_dim

    cfg = DataConfig(source=str(image_folder), resolution=16)
    src = load_source(cfg)
    loaders = {s: torch.utils.data.DataLoader(ImageSplit(src[s], cfg), batch_size=4) for s in ("validation", "test")}
    stage1 = full_evaluation(tiny_model.eval(), loaders, "test")
    prior = tiny_prior(TokenLayout(codebook_size=16, num_classes=0, height=4, width=4))
    with torch.no_grad():
        for p in prior.parameters():
            p.zero_()  # all logits equal: the uniform prior over the K codes
    two = two_stage_bits_per_dim(prior, tiny_model, loaders, "test")
    assert two["bits_per_dim"] == pytest.approx(stage1["bits_per_dim"], rel=1e-9)
    assert two["bits_per_dim_prior_term"] == pytest.approx(16 * 4 / 256)


def test_the_two_stage_bound_scores_the_images_the_codes_were_extracted_from(stage1, tmp_path, image_folder):
    from stage1_vqvae.model import VQVAE
    from stage2_prior.evaluate import main as evaluate

    _, vqvae_dir, _ = stage1
    other = tmp_path / "other_images"
    shutil.copytree(image_folder, other)
    for extra in sorted((other / "test").rglob("*.png"))[:3]:
        extra.unlink()  # 5 test images here, 8 in the VQ-VAE's training folder
    codes = extract(
        VQVAE.from_pretrained(vqvae_dir),
        DataConfig(source=str(other), resolution=16, resize_mode="stretch"),
        tmp_path / "codes",
        model_location=str(vqvae_dir),
    )
    prior = train2(tmp_path / "s2", codes, "train.max_steps=1", "train.checkpoint_every=0")
    result = evaluate(["--prior", str(prior), "--split", "test"])
    assert result["num_sequences"] == 5 and result["two_stage"]["num_images"] == 5

"""Code extraction (schema, order, metadata, Hub layout) and the evaluation metrics against references."""

import json
import math
import shutil

import datasets
import pytest
import torch

from stage1_vqvae.common import VqgenError
from stage1_vqvae.data import DataConfig, ImageSplit, load_source, to_model_input
from stage1_vqvae.evaluate import bits_per_dim, discretized_gaussian_nll, full_evaluation, ssim
from stage1_vqvae.extract import extract, publish_codes
from stage1_vqvae.hub import load_code_dataset, state_fingerprint


def test_extraction_schema_order_and_metadata(tiny_model, image_folder, tmp_path):
    cfg = DataConfig(source=str(image_folder), resolution=16)
    out = extract(tiny_model, cfg, tmp_path / "codes", model_location="somewhere/vqvae", batch_size=5)
    dd, meta = load_code_dataset(out)
    assert set(dd) == {"train", "validation", "test"}
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["train"].features["label"].names == ["a", "b"]
    src = load_source(cfg)
    for split in dd:
        expected = tiny_model.encode(to_model_input(ImageSplit(src[split], cfg).images))
        got = torch.from_numpy(dd[split].with_format("numpy")[:]["codes"])
        assert torch.equal(got.long(), expected), split  # same rows, same order, batch boundaries irrelevant
        assert dd[split]["label"] == src[split]["label"]
    assert meta["codebook_size"] == 16 and meta["grid"] == [4, 4]
    assert meta["vqvae_fingerprint"] == state_fingerprint(tiny_model)
    assert meta["vqvae_location"] == "somewhere/vqvae" and meta["source_dataset"] == str(image_folder)
    assert meta["splits"] == {k: len(v) for k, v in dd.items()} and meta["image_size"] == 16
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind
    with pytest.raises(VqgenError, match="already exists"):
        extract(tiny_model, cfg, out, model_location="x")


def test_published_code_dataset_loads_back_with_its_features(tiny_model, image_folder, tmp_path):
    out = extract(tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes",
                  model_location="x")
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            uploaded["repo_type"] = kw.get("repo_type")

        def upload_folder(self, *, folder_path, repo_id, repo_type, **kw):
            shutil.copytree(folder_path, tmp_path / "remote")
            return "https://hub.local/commit"

    publish_codes(out, "me/codes", api=FakeApi())
    assert uploaded["repo_type"] == "dataset"
    assert (tmp_path / "remote" / "data" / "train-00000-of-00001.parquet").is_file()
    card = (tmp_path / "remote" / "README.md").read_text()
    assert "vqgen" in card and "K=16" in card
    dd, meta = load_code_dataset(tmp_path / "remote")
    local, _ = load_code_dataset(out)
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["test"]["codes"] == local["test"]["codes"]
    assert json.loads((tmp_path / "remote" / "vqgen_codes.json").read_text()) == meta


def test_discretized_gaussian_is_a_proper_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    for mu in (-1.0, -0.3, 0.0, 0.97, 1.0):
        for sigma in (0.5, 3.0, 40.0):
            nll = discretized_gaussian_nll(levels, torch.full((256, 1, 1, 1), mu), sigma)
            assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_bits_per_dim_formula():
    # -log p(x|z) = 1000 nats, 49 codes of K = 256, 784 subpixels
    assert bits_per_dim(1000.0, 49, 256, 784) == pytest.approx((1000 + 49 * math.log(256)) / 784 / math.log(2))


def test_ssim_reference_values():
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ssim(x, torch.rand(2, 1, 16, 16)) < 0.5).all()


def test_full_evaluation_reports_every_metric(tiny_model, image_folder):
    cfg = DataConfig(source=str(image_folder), resolution=16)
    src = load_source(cfg)
    loaders = {s: torch.utils.data.DataLoader(ImageSplit(src[s], cfg), batch_size=4) for s in ("validation", "test")}
    r = full_evaluation(tiny_model, loaders, "test")
    assert r["num_images"] == 8 and 0 <= r["usage"] <= 1 and 1 <= r["perplexity"] <= 16
    psnrs = []
    for u8 in loaders["test"].dataset.images:
        recon = tiny_model.decode_codes(tiny_model.encode(to_model_input(u8[None])))
        mse = ((u8.double() / 255 - (recon.double().clamp(-1, 1) + 1) / 2) ** 2).mean()
        psnrs.append(10 * torch.log10(1 / mse))
    assert r["psnr"] == pytest.approx(torch.stack(psnrs).mean().item(), rel=1e-5)
    assert r["bits_per_dim"] == pytest.approx(r["bits_per_dim_decoder_term"] + r["bits_per_dim_prior_term"])
    assert r["bits_per_dim_prior_term"] == pytest.approx(16 * math.log2(16) / 256)

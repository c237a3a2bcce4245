"""Code extraction (schema, order, metadata, Hub layout) and the evaluation metrics against references."""

import json
import math

import datasets
import pytest
import torch

from stage1_vqvae.common import VqgenError
from stage1_vqvae.data import DataConfig, ImageSplit, load_source, to_model_input
from stage1_vqvae.evaluate import bits_per_dim, discretized_gaussian_nll, full_evaluation, ssim
from stage1_vqvae.extract import extract, publish_codes
from stage1_vqvae.hub import load_code_dataset, state_fingerprint

from helpers import run_two_processes


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


def test_published_code_dataset_loads_back_with_its_features(tiny_model, image_folder, tmp_path, fake_hub):
    out = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="x"
    )
    api = fake_hub()
    publish_codes(out, "me/codes", api=api)
    assert api.created == [("me/codes", "dataset")]
    remote = tmp_path / "remote" / "dataset" / "me" / "codes"
    assert (remote / "data" / "train-00000-of-00001.parquet").is_file()
    card = (remote / "README.md").read_text()
    assert "vqgen" in card and "K=16" in card
    dd, meta = load_code_dataset(remote)
    local, _ = load_code_dataset(out)
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["test"]["codes"] == local["test"]["codes"]
    assert json.loads((remote / "vqgen_codes.json").read_text()) == meta


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


@pytest.mark.slow
def test_two_process_extraction_gives_one_dataset_in_the_original_order(tiny_model, image_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "vq")
    data = {"source": str(image_folder), "resolution": 16}
    (tmp_path / "vq" / "data_config.json").write_text(json.dumps(data))
    proc = run_two_processes(
        29535,
        "stage1_vqvae.extract",
        "--model",
        str(tmp_path / "vq"),
        "--out",
        str(tmp_path / "two"),
        "--batch_size",
        "3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = extract(tiny_model, DataConfig(**data), tmp_path / "one", model_location="x")
    a, _ = load_code_dataset(one)
    b, meta = load_code_dataset(tmp_path / "two")
    for split in a:
        assert a[split]["codes"] == b[split]["codes"] and a[split]["label"] == b[split]["label"], split
    assert meta["splits"] == {k: len(v) for k, v in a.items()}


def test_sigma_fit_finds_the_grid_minimum(tiny_model, image_folder):
    from stage1_vqvae.evaluate import SIGMA_GRID, evaluate_model, fit_sigma

    cfg = DataConfig(source=str(image_folder), resolution=16)
    loader = torch.utils.data.DataLoader(ImageSplit(load_source(cfg)["validation"], cfg), batch_size=4)
    brute = evaluate_model(tiny_model, loader, sigmas=SIGMA_GRID)["nll_per_image"]
    assert fit_sigma(tiny_model, loader) == SIGMA_GRID[min(range(len(brute)), key=brute.__getitem__)]

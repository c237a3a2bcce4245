"""Code extraction (schema, order, metadata, Hub layout) and the evaluation metrics against references."""

import dataclasses
import json
import math

import datasets
import pytest
import torch

from stage1_vqvae.data import DataConfig, ImageSplit, load_source, to_model_input
from stage1_vqvae.evaluate import discretized_gaussian_nll, full_evaluation, ssim
from stage1_vqvae.extract import extract, publish_codes
from vqgen.cli import VqgenError
from vqgen.codes import codes_fingerprint, load_code_dataset
from vqgen.hub import state_fingerprint

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
    assert meta.codebook_size == 16 and meta.grid == (4, 4) and meta.class_names == ["a", "b"]
    assert meta.vqvae_fingerprint == state_fingerprint(tiny_model)
    assert meta.vqvae_location == "somewhere/vqvae" and meta.source == str(image_folder)
    assert meta.data_config == dataclasses.asdict(cfg)
    assert meta.splits == {k: len(v) for k, v in dd.items()} and meta.image_size == 16
    assert meta.codes_fingerprint == codes_fingerprint(dd)
    # The plain datasets API reads the codes without vqgen.
    assert datasets.load_from_disk(str(out / "data"))["test"]["codes"] == dd["test"]["codes"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind
    with pytest.raises(VqgenError, match="already exists"):
        extract(tiny_model, cfg, out, model_location="x")


def test_published_code_dataset_loads_back_with_its_features(tiny_model, image_folder, tmp_path, fake_hub):
    out = extract(
        tiny_model, DataConfig(source=str(image_folder), resolution=16), tmp_path / "codes", model_location="me/vq"
    )
    publish_codes(out, "me/codes")
    remote = tmp_path / "remote" / "dataset" / "me" / "codes"
    assert sorted(p.name for p in (remote / "data").iterdir()) == [
        f"{s}-00000-of-00001.parquet" for s in ("test", "train", "validation")
    ]
    card = (remote / "README.md").read_text()
    assert "vqgen" in card and "K=16" in card and "me/vq" in card
    assert "dataset_info" in card and "num_examples" in card  # added by DatasetDict.push_to_hub to our card
    assert str(image_folder) not in card and str(tmp_path) not in card  # no local path on the Hub
    dd, meta = load_code_dataset(remote)
    local, _ = load_code_dataset(out)
    assert dd["train"].features["codes"] == datasets.Array2D((4, 4), "int16")
    assert dd["test"]["codes"] == local["test"]["codes"] and dd["train"]["label"] == local["train"]["label"]
    assert meta == load_code_dataset(out)[1]


def test_codes_fingerprint_covers_the_codes_not_just_the_metadata():
    def dd(codes, labels):
        features = datasets.Features({"codes": datasets.Array2D((2, 2), "int16"), "label": datasets.Value("int64")})
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"codes": codes, "label": labels}, features)})

    base = codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [0, 1]))
    assert base == codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [0, 1]))
    assert base != codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 9]]], [0, 1]))  # one code differs
    assert base != codes_fingerprint(dd([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [1, 1]))  # one label differs
    assert base != codes_fingerprint(dd([[[5, 6], [7, 8]], [[1, 2], [3, 4]]], [1, 0]))  # the order differs


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_code_changed_after_extraction_is_one_error_naming_both_fingerprints(tiny_model, image_folder, tmp_path,
                                                                               layout):  # fmt: skip
    import shutil

    from stage2_prior.data import CodeDataConfig, load_code_splits

    cfg = DataConfig(source=str(image_folder), resolution=16)
    out = extract(tiny_model, cfg, tmp_path / "codes", model_location="x")
    dd, meta = load_code_dataset(out)
    codes = dd["test"].with_format("numpy")[:]["codes"].copy()  # (8, 4, 4)
    codes[5, 2, 1] = (codes[5, 2, 1] + 1) % 16  # one code of one grid
    test = datasets.Dataset.from_dict({"codes": codes.tolist(), "label": dd["test"]["label"]}, dd["test"].features)
    edited = datasets.DatasetDict({**dd, "test": test})
    found = codes_fingerprint(edited)
    if layout == "save_to_disk":
        edited.save_to_disk(str(tmp_path / "edited"))
    else:  # the published layout, read from a local folder
        for split, ds in edited.items():
            ds.to_parquet(str(tmp_path / "edited" / f"{split}-00000-of-00001.parquet"))
    shutil.rmtree(out / "data")
    shutil.move(tmp_path / "edited", out / "data")
    for load in (
        lambda: load_code_dataset(out),
        lambda: load_code_splits(CodeDataConfig(codes=str(out))),
        lambda: load_code_splits(CodeDataConfig(codes=str(out), streaming=True)),
    ):
        with pytest.raises(VqgenError) as err:
            load()
        message = str(err.value)
        assert found[:16] in message and meta.codes_fingerprint[:16] in message and "re-run" in message


def test_discretized_gaussian_equals_a_high_precision_reference_in_the_tails():
    """Against mpmath at 50 digits, for sigma from 0.5 to 50 levels and means far outside the bins."""
    import mpmath

    mpmath.mp.dps = 50
    levels = torch.tensor([0, 1, 30, 128, 200, 254, 255], dtype=torch.uint8)
    for sigma in (0.5, 1.0, 4.0, 16.0, 50.0):
        for mu_level in (-40.0, 0.0, 30.0, 127.3, 255.0, 300.0):
            mean = torch.full((len(levels), 1, 1, 1), mu_level / 127.5 - 1, dtype=torch.float64)
            ours = discretized_gaussian_nll(levels.view(-1, 1, 1, 1), mean, sigma)
            for v, got in zip(levels.tolist(), ours.tolist()):
                lo = mpmath.mpf("-inf") if v == 0 else (v - 0.5 - mu_level) / mpmath.mpf(sigma)
                hi = mpmath.mpf("inf") if v == 255 else (v + 0.5 - mu_level) / mpmath.mpf(sigma)
                # The same mass, taken in the tail where 50 digits resolve it.
                mass = mpmath.ncdf(-lo) - mpmath.ncdf(-hi) if lo > 0 else mpmath.ncdf(hi) - mpmath.ncdf(lo)
                ref = -mpmath.log(mass)
                assert got == pytest.approx(float(ref), rel=1e-9, abs=1e-9), (sigma, mu_level, v)


def test_ssim_equals_a_per_window_reference():
    """Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), mean over the windows inside the image."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 13, 14, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    w = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2)).double()
    w = torch.outer(w, w) / w.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    expected = []
    for i in range(2):
        vals = []
        for c in range(2):
            for r in range(13 - 10):
                for col in range(14 - 10):
                    p, q = a[i, c, r : r + 11, col : col + 11], b[i, c, r : r + 11, col : col + 11]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
                    vals.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
        expected.append(torch.stack(vals).mean())
    assert torch.allclose(ssim(a, b), torch.stack(expected), atol=1e-12)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))


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


def test_evaluation_under_a_bf16_launch_scores_the_fp32_reconstructions_it_fits_sigma_on(tiny_model, image_folder):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = DataConfig(source=str(image_folder), resolution=16)
    src = load_source(cfg)
    results = []
    try:
        for precision in ("no", "bf16"):
            AcceleratorState._reset_state(True)
            accelerator = Accelerator(cpu=True, mixed_precision=precision)
            loaders = {
                s: accelerator.prepare(torch.utils.data.DataLoader(ImageSplit(src[s], cfg), batch_size=4))
                for s in ("validation", "test")
            }
            results.append(full_evaluation(tiny_model, loaders, "test", accelerator))
    finally:
        AcceleratorState._reset_state(True)
    assert results[1] == results[0]  # psnr, ssim, sigma, nll and bits/dim alike: nothing decoded in bf16


@pytest.mark.slow
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


def test_sigma_fit_finds_the_grid_minimum(tiny_model, image_folder):
    from stage1_vqvae.evaluate import SIGMA_GRID, evaluate_model, fit_sigma

    cfg = DataConfig(source=str(image_folder), resolution=16)
    loader = torch.utils.data.DataLoader(ImageSplit(load_source(cfg)["validation"], cfg), batch_size=4)
    brute = evaluate_model(tiny_model, loader, sigmas=SIGMA_GRID)["nll_per_image"]
    assert fit_sigma(tiny_model, loader) == SIGMA_GRID[min(range(len(brute)), key=brute.__getitem__)]

"""Stage-1 evaluation against references: the discretised Gaussian, SSIM, sigma, every metric, precision."""

import math

import pytest
import torch

from stage1_vqvae.data import DataConfig, ImageSplit, to_model_input
from stage1_vqvae.evaluate import discretized_gaussian_nll, full_evaluation, ssim
from stage1_vqvae.sources import load_source


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


def test_sigma_fit_finds_the_grid_minimum(tiny_model, image_folder):
    from stage1_vqvae.evaluate import SIGMA_GRID, evaluate_model, fit_sigma

    cfg = DataConfig(source=str(image_folder), resolution=16)
    loader = torch.utils.data.DataLoader(ImageSplit(load_source(cfg)["validation"], cfg), batch_size=4)
    brute = evaluate_model(tiny_model, loader, sigmas=SIGMA_GRID)["nll_per_image"]
    assert fit_sigma(tiny_model, loader) == SIGMA_GRID[min(range(len(brute)), key=brute.__getitem__)]


def test_evaluation_decodes_on_the_fly_in_workers(tmp_path, tiny_model, image_folder):
    import json as _json

    from stage1_vqvae.evaluate import main as evaluate

    tiny_model.save_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "data_config.json").write_text(_json.dumps({"source": str(image_folder), "resolution": 16}))
    in_memory = evaluate(["--model", str(tmp_path / "vq"), "--split", "test"])
    on_the_fly = evaluate(
        ["--model", str(tmp_path / "vq"), "--split", "test", "data.cache_max_gb=0", "--num_workers", "2"]
    )
    assert on_the_fly == in_memory  # the same images, whichever way they are read

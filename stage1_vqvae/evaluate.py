"""Evaluate a trained VQ-VAE on a split: MSE, PSNR, SSIM, codebook usage, perplexity and the paper's bits/dim.

    python -m stage1_vqvae.evaluate --model runs/mnist/stage1/model --split test [--output_dir DIR]
    python -m stage1_vqvae.evaluate --model runs/mnist/stage1/model data.source=/path/to/images

Bits/dim bound (paper, sec. 4.1, with the uniform prior of stage-1 training):
    bpd = ( -log p(x|z_q) + n_codes * log K ) / (C*H*W) / ln 2
where p(x|z_q) is a *discretised Gaussian* over the 256 levels of every subpixel: mean = the decoder's output
(in pixel units), one scale sigma for the whole model, and the mass of the bin [v-0.5, v+0.5] for level v
(the two end bins extend to -inf / +inf), so the likelihood is a proper distribution over {0..255}^(C*H*W).
Sigma is fitted on the validation split (a grid search over NLL), never on the split being scored.

MSE and PSNR are computed on images scaled to [0, 1]; PSNR is the mean of per-image PSNRs; SSIM uses an
11x11 Gaussian window (sigma 1.5, K1=0.01, K2=0.03), averaged over channels and images.

The field's tokenizer figures come too when their weight files are present (vqgen.metrics; nothing downloaded):
rFID, the FID (torch-fidelity's Inception-V3 pool3) of the split's reconstructions, saved as uint8 images,
against its originals, every image once; and LPIPS (v0.1, VGG backbone by default) between each image and its
reconstruction, averaged. `--standard_metrics on` makes a missing weight file an error, `off` skips them.
"""

from __future__ import annotations

import argparse
import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from stage1_vqvae.data import LazyImageSplit, data_config_for, load_splits, to_model_input
from stage1_vqvae.model import VQVAE
from stage1_vqvae.sources import _cache_root
from vqgen.cli import report_metrics, run_cli
from vqgen.metrics import standard
from vqgen.metrics.fidelity import ReferenceSplit, eval_batch_size
from vqgen.metrics.scores import frechet_distance, gaussian_stats

SIGMA_GRID = [0.5 * 2 ** (i / 4) for i in range(37)]  # 0.5 .. 256 pixel levels, 4 per octave


# --------------------------------------------------------------------------------------------------
# Metrics


def discretized_gaussian_nll(images_uint8: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-image -log p(x | mean) in nats, x in {0..255} per subpixel; mean (B, C, H, W) in [-1, 1] units.

    The log-mass of a bin is computed from log-CDFs (`log_ndtr`) with a stable log-difference, always in the
    tail nearer the bin (mirrored for bins above the mean), so it stays exact far in the tails where a
    difference of CDFs underflows to 0 (below z = -8.3 in float64).
    """
    x = images_uint8.double()  # (B, C, H, W) levels
    mu = (mean.double() + 1.0) * 127.5  # decoder mean in level units
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    upper = torch.where(x >= 255, inf, (x + 0.5 - mu) / sigma)  # the edge bins take the tails
    lower = torch.where(x <= 0, -inf, (x - 0.5 - mu) / sigma)
    below = x <= mu  # bins below the mean: P = Phi(u) - Phi(l); above it, mirrored: Phi(-l) - Phi(-u)
    hi, lo = torch.where(below, upper, -lower), torch.where(below, lower, -upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    logp = log_hi + torch.log(-torch.expm1(log_lo - log_hi))  # log(Phi(hi) - Phi(lo)), lo < hi
    return -logp.flatten(1).sum(1)  # (B,)


def _gaussian_band(n: int, size: int, device, sigma: float = 1.5) -> torch.Tensor:
    """(n, n - size + 1) float64 matrix whose columns are the shifted normalised 1-D Gaussian window: x @ band
    filters x's last axis ('valid'). The 2-D window of SSIM is the outer product of two such 1-D windows, so
    filtering is two matrix products (MKL's dgemm), 15-20x faster than a depthwise float64 conv on CPU."""
    g = torch.exp(-((torch.arange(size, device=device) - size // 2) ** 2) / (2 * sigma**2)).double()
    g = g / g.sum()
    band = torch.zeros(n, n - size + 1, dtype=torch.float64, device=device)
    for j in range(n - size + 1):
        band[j : j + size, j] = g
    return band


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (Wang et al. 2004 constants, 11x11 Gaussian window of
    sigma 1.5, valid filtering), in float64."""
    size = min(11, a.shape[-1], a.shape[-2])
    rows, cols = _gaussian_band(a.shape[-2], size, a.device), _gaussian_band(a.shape[-1], size, a.device)
    c1, c2 = 0.01**2, 0.03**2
    out = []
    # A few images at a time: the float64 statistics of 64 RGB images at 128 px would take ~0.75 GB at once.
    chunk = max(1, 2**22 // a[0].numel())
    for lo in range(0, a.shape[0], chunk):
        x, y = a[lo : lo + chunk].double(), b[lo : lo + chunk].double()
        stack = torch.stack([x, y, x * x, y * y, x * y])  # (5, b, C, H, W)
        mu_a, mu_b, aa, bb, ab = rows.T @ (stack @ cols)  # each (b, C, H', W'): window means
        var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        out.append(s.flatten(1).mean(1))
    return torch.cat(out)  # (B,)


def codebook_stats(counts: torch.Tensor) -> dict:
    probs = counts.double() / counts.sum().clamp_min(1)
    nz = probs[probs > 0]
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "codes_used": int((counts > 0).sum()),
    }


@torch.no_grad()
def evaluate_model(model, loader, accelerator=None, sigmas=(None,), max_batches: int | None = None) -> dict:
    """Reconstruction metrics over a loader of {'images': uint8}; `sigmas` adds the discretised-Gaussian NLL.

    Under Accelerate each rank scores its shard and the per-image figures are gathered with
    `gather_for_metrics`, which drops the samples a prepared loader repeats to pad its last batch: every image
    counts exactly once, and every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    cfg = unwrapped.config
    device = accelerator.device if accelerator else next(model.parameters()).device
    counts = torch.zeros(cfg.codebook_size, dtype=torch.float64, device=device)
    totals = torch.zeros(4 + len(sigmas), dtype=torch.float64, device=device)  # n, mse, psnr, ssim, nll per sigma
    channels_last = next(unwrapped.parameters()).is_contiguous(memory_format=torch.channels_last)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        u8 = batch["images"].to(device)
        x = to_model_input(u8)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # In fp32 whatever the launch's mixed precision, as `fit_sigma` decodes: a sigma fitted on one kind of
        # reconstruction is not scored on another (bf16 outputs differ where a small sigma resolves them).
        with torch.autocast(device.type, enabled=False):
            codes = unwrapped.encode(x)  # (B, h, w)
            recon = unwrapped.decode_codes(codes).float()  # (B, C, H, W)
        a01, b01 = (x.float() + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
        mse = ((a01 - b01) ** 2).flatten(1).mean(1).double()  # (B,)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        nll = [discretized_gaussian_nll(u8, recon, s) if s is not None else torch.zeros_like(mse) for s in sigmas]
        per_image = torch.stack([torch.ones_like(mse), mse, psnr, ssim(a01, b01), *nll], dim=1)  # (B, 4 + S)
        if accelerator is not None:
            per_image, codes = accelerator.gather_for_metrics((per_image, codes))
        totals += per_image.sum(0)
        counts += torch.bincount(codes.flatten(), minlength=cfg.codebook_size).double()
    model.train(was_training)
    n = totals[0].item()
    out = {
        "num_images": int(n),
        "mse": totals[1].item() / n,
        "psnr": totals[2].item() / n,
        "ssim": totals[3].item() / n,
        **codebook_stats(counts),
    }
    if any(s is not None for s in sigmas):
        out["nll_per_image"] = [v / n for v in totals[4:].tolist()]
    return out


def bits_per_dim(nll_per_image_nats: float, n_codes: int, codebook_size: int, n_subpixels: int) -> float:
    """The paper's bound with a uniform prior: (-log p(x|z_q) + n_codes log K) / subpixels / ln 2."""
    return (nll_per_image_nats + n_codes * math.log(codebook_size)) / n_subpixels / math.log(2)


@torch.no_grad()
def fit_sigma(model, loader, accelerator=None, max_images: int = 1000) -> float:
    """The decoder scale minimising the discretised-Gaussian NLL on `loader` (use the validation split).

    Reconstructions of up to `max_images` images are computed once and every sigma of the grid is scored on
    them (a 1-D fit: 1000 images pin it down to well within the grid's spacing).
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    device = accelerator.device if accelerator else next(unwrapped.parameters()).device
    was_training = unwrapped.training
    unwrapped.eval()
    pairs, n = [], 0
    for batch in loader:
        u8 = batch["images"].to(device)
        with torch.autocast(device.type, enabled=False):  # fp32, as `evaluate_model` scores
            recon = unwrapped.decode_codes(unwrapped.encode(to_model_input(u8))).float()
        if accelerator is not None:  # every rank scores all images (each once), so no reduction follows
            u8, recon = accelerator.gather_for_metrics((u8, recon))
        pairs.append((u8[: max_images - n], recon[: max_images - n]))
        n += len(pairs[-1][0])
        if n >= max_images:
            break
    unwrapped.train(was_training)

    def score(grid: list[float]) -> list[float]:
        return [sum(discretized_gaussian_nll(u8, r, s).sum().item() for u8, r in pairs) for s in grid]

    # Coarse to fine on the grid (the NLL is unimodal in log sigma): every 4th point, then the neighbours.
    coarse = list(range(0, len(SIGMA_GRID), 4))
    best = coarse[min(range(len(coarse)), key=score([SIGMA_GRID[i] for i in coarse]).__getitem__)]
    fine = list(range(max(0, best - 3), min(len(SIGMA_GRID), best + 4)))
    return SIGMA_GRID[fine[min(range(len(fine)), key=score([SIGMA_GRID[i] for i in fine]).__getitem__)]]


def full_evaluation(model, loaders: dict, split: str, accelerator=None) -> dict:
    """All metrics on `split`, with sigma fitted on loaders['validation']."""
    cfg = (accelerator.unwrap_model(model) if accelerator else model).config
    sigma = fit_sigma(model, loaders["validation"], accelerator)
    r = evaluate_model(model, loaders[split], accelerator, sigmas=(sigma,))
    n_codes = cfg.grid_size**2
    subpixels = cfg.in_channels * cfg.image_size**2
    nll = r.pop("nll_per_image")[0]
    r.update(
        {
            "split": split,
            "decoder_sigma_levels": sigma,
            "decoder_nll_nats_per_image": nll,
            "bits_per_dim": bits_per_dim(nll, n_codes, cfg.codebook_size, subpixels),
            "bits_per_dim_decoder_term": nll / subpixels / math.log(2),
            "bits_per_dim_prior_term": n_codes * math.log(cfg.codebook_size) / subpixels / math.log(2),
            "codebook_size": cfg.codebook_size,
        }
    )
    return r


@torch.no_grad()
def reconstruction_fidelity(model, split, loader, accelerator, inception=None, lpips=None, cache_dir=None) -> dict:
    """rFID and LPIPS of the reconstructions of every image of `split` (its prepared `loader`), gathered across
    ranks (each image once). The originals' features are the split's cached reference statistics."""
    if inception is None and lpips is None:
        return {}
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    device = accelerator.device if accelerator else next(unwrapped.parameters()).device
    was_training = unwrapped.training
    unwrapped.eval()
    ref = None
    if inception is not None:
        inception.to(device)
        ref = ReferenceSplit.load_or_compute(split, loader, inception, accelerator, cache_dir)
    if lpips is not None:
        lpips.to(device).check_size(*split[0]["images"].shape[-2:])
    pools, distances = [], []
    for batch in loader:
        u8 = batch["images"].to(device)
        x = to_model_input(u8)
        with torch.autocast(device.type, enabled=False):  # fp32, as evaluate_model scores
            recon = unwrapped.decode_codes(unwrapped.encode(x)).float().clamp(-1, 1)  # (B, C, H, W)
        rows = []
        if inception is not None:  # the reconstruction as a saved image would hold it
            rows.append(inception(((recon + 1) * 127.5).round().to(torch.uint8))["pool"])
        if lpips is not None:
            rows.append(lpips(x, recon))  # (B,)
        if accelerator is not None:
            rows = accelerator.gather_for_metrics(tuple(rows))
        if inception is not None:
            pools.append(rows[0].cpu())
        if lpips is not None:
            distances.append(rows[-1].double().cpu())
    unwrapped.train(was_training)
    out = {}
    if inception is not None:
        out["rfid"] = frechet_distance(gaussian_stats(torch.cat(pools)), ref.stats)
        out["rfid_num_images"] = len(ref.pool)
        out["inception_weights_sha256"] = inception.digest
    if lpips is not None:
        out["lpips"] = float(torch.cat(distances).mean())
        out["lpips_net"] = f"{lpips.pnet_type} (v0.1)"
    return out


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="VQ-VAE folder or Hub repo id")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers decoding images")
    parser.add_argument("--output_dir", default=None, help="also write metrics.json into this folder")
    parser.add_argument("--update_card", action="store_true", help="write the figures into the model folder's card")
    standard.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    metrics_cfg = standard.from_arguments(args)
    accelerator = Accelerator()  # under accelerate launch / torchrun every process scores its shard
    # The metric networks first: a missing weight file under --standard_metrics on fails before any work.
    inception, lpips = standard.load_inception(metrics_cfg), standard.load_lpips(metrics_cfg)
    model = VQVAE.from_pretrained(args.model).to(accelerator.device, memory_format=torch.channels_last)
    data_cfg = data_config_for(model.data_config, rest)
    with accelerator.main_process_first():
        splits = load_splits(data_cfg, splits=sorted({"validation", args.split}))
    workers = args.num_workers
    if workers is None:  # splits decoded on the fly want workers; splits in memory do not
        lazy = any(isinstance(v, LazyImageSplit) for v in splits.values())
        workers = LazyImageSplit.default_workers(accelerator.num_processes) if lazy else 0
    loaders = {
        k: accelerator.prepare(
            DataLoader(
                v, batch_size=eval_batch_size(len(v), args.batch_size, accelerator.num_processes), num_workers=workers
            )
        )  # fmt: skip
        for k, v in splits.items()
    }
    result = full_evaluation(model, loaders, args.split, accelerator)
    result.update(
        reconstruction_fidelity(model, splits[args.split], loaders[args.split], accelerator, inception, lpips,
                                _cache_root(data_cfg))
    )  # fmt: skip
    if accelerator.is_main_process:
        report_metrics(result, args.output_dir)
        if args.update_card:
            update_card(args.model, data_cfg, result)
    return result


def update_card(model: str, data_cfg, result: dict) -> None:
    from pathlib import Path

    from vqgen.cli import VqgenError
    from vqgen.hub import add_eval_results, dataset_label

    readme = Path(model) / "README.md"
    if not readme.is_file():
        raise VqgenError(f"--update_card writes into a local model folder's README.md; {readme} does not exist")
    add_eval_results(
        readme, Path(model).name, "image-to-image", dataset_label(data_cfg.source), result["split"], result
    )


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

"""Evaluate a prior: held-out NLL in nats and bits per code, and the paper's two-stage bound in bits/dim.

    python -m stage2_prior.evaluate --prior runs/mnist/stage2/model --split test
    python -m stage2_prior.evaluate --prior user/prior --codes user/codes --vqvae user/vqvae --output_dir DIR

Bits per code are measured over the K code tokens (the distribution that sampling draws from), against the
uniform prior's log2 K. The two-stage bound (paper, sec. 4.1) is
    bpd = ( -log p(x|z_q) - log p(z) ) / (C*H*W) / ln 2,   z = the VQ-VAE's codes of x,
with the same discretised-Gaussian decoder likelihood (sigma fitted on the validation split) as stage-1
evaluation and p(z) the prior's unconditional (NULL-class) probability; with a uniform prior it equals the
stage-1 bound exactly. The images are those the codes were extracted from (the codes' `data_config`), so the
bound always scores the data the prior was evaluated on.
"""

from __future__ import annotations

import argparse
import math

import torch

from stage1_vqvae.data import DataConfig, load_splits, to_model_input
from stage1_vqvae.evaluate import discretized_gaussian_nll, fit_sigma
from stage1_vqvae.model import VQVAE
from stage2_prior.data import CodeDataConfig, load_code_splits
from stage2_prior.model import bits_per_code, code_nll, codes_meta_of, grid_to_input_ids, layout_of, load_prior
from vqgen.cli import VqgenError, launch_state, report_metrics, run_cli
from vqgen.config import from_dict
from vqgen.hub import state_fingerprint


@torch.no_grad()
def sequences_nll(prior, input_ids: torch.Tensor, batch_size: int = 256) -> float:
    """Mean per-sequence code NLL (nats) over (N, T) input ids."""
    device = next(prior.parameters()).device
    total = 0.0
    for lo in range(0, len(input_ids), batch_size):
        total += code_nll(prior, input_ids[lo : lo + batch_size].to(device)).double().sum().item()
    return total / len(input_ids)


@torch.no_grad()
def two_stage_bits_per_dim(prior, vqvae, loaders: dict, split: str) -> dict:
    """The paper's bound on `split`; sigma of the decoder likelihood fitted on loaders['validation']."""
    layout = layout_of(prior)
    sigma = fit_sigma(vqvae, loaders["validation"])
    dec, pri, n = 0.0, 0.0, 0
    device = next(vqvae.parameters()).device
    for batch in loaders[split]:
        u8 = batch["images"].to(device)
        codes = vqvae.encode(to_model_input(u8))  # (B, h, w)
        recon = vqvae.decode_codes(codes).float()
        dec += discretized_gaussian_nll(u8, recon, sigma).sum().item()
        ids = grid_to_input_ids(codes, layout)  # NULL class: the unconditional p(z)
        pri += code_nll(prior, ids.to(next(prior.parameters()).device)).double().sum().item()
        n += len(u8)
    cfg = vqvae.config
    subpixels = cfg.in_channels * cfg.image_size**2
    return {
        "bits_per_dim": (dec + pri) / n / subpixels / math.log(2),
        "bits_per_dim_decoder_term": dec / n / subpixels / math.log(2),
        "bits_per_dim_prior_term": pri / n / subpixels / math.log(2),
        "prior_nll_nats_per_image": pri / n,
        "decoder_sigma_levels": sigma,
        "num_images": n,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True, help="prior folder or Hub repo id")
    parser.add_argument("--codes", default=None, help="code dataset (default: the one the prior was trained on)")
    parser.add_argument("--vqvae", default=None, help="VQ-VAE for the bits/dim bound (default: the codes' own)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--output_dir", default=None, help="also write metrics.json into this folder")
    args = parser.parse_args(argv)

    prior = load_prior(args.prior)
    learned, layout = codes_meta_of(prior), layout_of(prior)
    codes = args.codes or prior.config.vqgen.get("code_dataset")
    if not codes:
        raise VqgenError("the prior does not record its code dataset; pass --codes")
    splits, meta, _ = load_code_splits(
        CodeDataConfig(codes=codes, conditional=layout.num_classes > 0), splits=(args.split,)
    )
    learned.check_same_vqvae(meta, f"code dataset {codes}")
    ids = splits[args.split].input_ids
    nll = sequences_nll(prior, ids, args.batch_size)
    result = {
        "split": args.split,
        "nll_nats_per_code": nll / layout.num_codes,
        "bits_per_code": bits_per_code(nll, layout),
        "uniform_bits_per_code": math.log2(layout.codebook_size),
        "num_sequences": len(ids),
        "conditional": layout.num_classes > 0,
    }
    vq_loc = args.vqvae or meta.vqvae_location
    if vq_loc:
        vqvae = VQVAE.from_pretrained(vq_loc)
        meta.check_vqvae(
            vqvae.config.codebook_size, vqvae.config.grid_size, state_fingerprint(vqvae), f"VQ-VAE {vq_loc}"
        )
        # The images the codes were extracted from, not the VQ-VAE's training data (they may differ).
        data_cfg = from_dict(DataConfig, meta.data_config, "the codes' data_config")
        images = load_splits(data_cfg, splits=sorted({"validation", args.split}))
        loaders = {k: torch.utils.data.DataLoader(v, batch_size=args.batch_size) for k, v in images.items()}
        result["two_stage"] = two_stage_bits_per_dim(
            prior, vqvae.to(memory_format=torch.channels_last), loaders, args.split
        )
    if layout.num_classes:
        if "two_stage" in result:  # the bound's p(z) is the NULL-class NLL of the same codes: do not redo it
            uncond_nll = result["two_stage"]["prior_nll_nats_per_image"]
        else:
            uncond = ids.clone()
            uncond[:, 1] = layout.null
            uncond_nll = sequences_nll(prior, uncond, args.batch_size)
        result["bits_per_code_unconditional"] = bits_per_code(uncond_nll, layout)
    if launch_state().is_main_process:  # under a launcher every process computes the same: one prints
        report_metrics(result, args.output_dir)
    return result


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

"""The field's stage-1 network: the VQGAN encoder/decoder (Esser et al. 2021) that taming, LlamaGen's VQ-16,
MaskGIT, aMUSEd and latent-diffusion's VQ-f4/f8/f16 share, built on diffusers' own `Encoder`/`Decoder` modules
(`diffusers.models.autoencoders.vae`, the modules `diffusers.VQModel` assembles), not a copy of them.

    encoder:  x -> 3x3 conv -> [residual blocks (+ attention) -> downsample] per level -> mid block (res, attn, res)
              -> GroupNorm, SiLU, 3x3 conv -> latent_channels -> 1x1 quant_conv -> z_e (D channels)
    decoder:  z_q -> 1x1 post_quant_conv -> 3x3 conv -> mid block -> [residual blocks (+ attention) -> upsample]
              per level -> GroupNorm, SiLU, 3x3 conv -> x

The 1x1 convs are VQModel's `quant_conv`/`post_quant_conv`, so the whole network maps key for key onto a VQModel;
the quantizer between them is vqgen's (`quantizers.py`), with every option of the paper's network. This file also
holds that mapping: the VQModel config of a vqgan network, its weights in VQModel's names, and the reader of an
exported folder (`export_diffusers.py` writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from stage1_vqvae.configuration import VQVAEConfig

EXPORT_FILE = "vqgen.json"  # vqgen's metadata beside diffusers' config.json: config, data config, provenance
EXTRA_WEIGHTS = "vqgen_extra.safetensors"  # vqgen's tensors a VQModel has no place for (EMA statistics, ...)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def block_types(cfg: VQVAEConfig) -> tuple[list[str], list[str]]:
    """diffusers' down/up block types: the attention variant at the levels in attn_resolutions."""
    attn = set(cfg.attn_resolutions if cfg.attn_resolutions is not None else [cfg.grid_size])
    sizes = cfg.level_sizes
    down = ["AttnDownEncoderBlock2D" if s in attn else "DownEncoderBlock2D" for s in sizes]
    up = ["AttnUpDecoderBlock2D" if s in attn else "UpDecoderBlock2D" for s in reversed(sizes)]  # lowest first
    return down, up


def latent_channels(cfg: VQVAEConfig) -> int:
    return cfg.latent_channels or cfg.codebook_dim


class VQGANEncoder(nn.Module):
    """diffusers' Encoder then VQModel's 1x1 `quant_conv` into the D channels the quantizer reads."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder  # imported here: ~4 s that the paper's network skips

        down, _ = block_types(cfg)
        self.net = Encoder(
            in_channels=cfg.in_channels,
            out_channels=latent_channels(cfg),
            down_block_types=tuple(down),
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            act_fn="silu",
            double_z=False,
            mid_block_add_attention=cfg.mid_block_attention,
        )
        self.quant_conv = nn.Conv2d(latent_channels(cfg), cfg.codebook_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.net(x))  # (B, C, H, W) -> (B, latent, h, w) -> (B, D, h, w)


class VQGANDecoder(nn.Module):
    """VQModel's 1x1 `post_quant_conv` then diffusers' Decoder (one more residual block per level than the encoder)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        _, up = block_types(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, latent_channels(cfg), 1)
        self.net = Decoder(
            in_channels=latent_channels(cfg),
            out_channels=cfg.in_channels,
            up_block_types=tuple(up),
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            act_fn="silu",
            norm_type="group",
            mid_block_add_attention=cfg.mid_block_attention,
        )

    @property
    def last_layer(self) -> torch.Tensor:
        return self.net.conv_out.weight  # where the adversarial loss's adaptive weight is measured

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(self.post_quant_conv(z_q))  # (B, D, h, w) -> (B, latent, h, w) -> (B, C, H, W)


# --------------------------------------------------------------------------------------------------
# The same network as a diffusers.VQModel


def vqmodel_config(cfg: VQVAEConfig, lookup_dim: int) -> dict:
    """The `diffusers.VQModel(**config)` whose modules are this network's; codes live in `lookup_dim` dims."""
    down, up = block_types(cfg)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=latent_channels(cfg),
        sample_size=cfg.image_size,
        num_vq_embeddings=cfg.codebook_size,
        norm_num_groups=cfg.norm_num_groups,
        vq_embed_dim=lookup_dim,
        norm_type="group",
        mid_block_add_attention=cfg.mid_block_attention,
        lookup_from_codebook=True,  # so that VQModel.decode(codes, force_not_quantize=True, shape=...) works
    )


# vqgen key prefix <-> VQModel key prefix, for the modules the two share one for one.
SHARED_PREFIXES = {
    "encoder.net.": "encoder.",
    "encoder.quant_conv.": "quant_conv.",
    "decoder.post_quant_conv.": "post_quant_conv.",
    "decoder.net.": "decoder.",
}


def to_vqmodel_key(key: str) -> str | None:
    """A vqgen state-dict key's VQModel name, or None for the quantizer's tensors (VQModel has its own)."""
    for ours, theirs in SHARED_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def read_diffusers_export(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """An exported folder's (vqgen.json's metadata, vqgen state dict), or None if `folder` is not one.

    Every tensor that VQModel holds as vqgen does comes from diffusers' weights file (renamed); the rest
    (the quantizer's state, and the 1x1 convs where a projection was folded into them) from vqgen's extra file,
    so loading gives the exported model bit for bit.
    """
    meta_file = Path(folder) / EXPORT_FILE
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    reverse = {theirs: ours for ours, theirs in SHARED_PREFIXES.items()}
    state = {}
    for key, tensor in load_file(str(Path(folder) / DIFFUSERS_WEIGHTS)).items():
        prefix = next((p for p in reverse if key.startswith(p)), None)
        if prefix is not None:
            state[reverse[prefix] + key[len(prefix) :]] = tensor
    state.update(load_file(str(Path(folder) / EXTRA_WEIGHTS)))
    return meta, state

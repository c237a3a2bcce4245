"""The stage-1 model's config: one typed dataclass, the schema of `model.*` in the YAML configs and of the saved
`config.json`, with every check that can be made before a network is built (the paper's network and quantizer
options, and the vqgan network's knobs: `check_network`). `model.py` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vqgen.config import option


@dataclass
class VQVAEConfig:
    in_channels: int = option(1, "image channels (1 = L, 3 = RGB)")
    image_size: int = option(28, "square input side; must be divisible by `downsample`")
    hidden_channels: int = option(256, "width of every conv (paper: 256)")
    res_channels: int = option(256, "hidden width inside a residual block (paper: 256)")
    num_res_blocks: int = option(2, "residual blocks in encoder and decoder each (paper: 2)")
    downsample: int = option(4, "total spatial reduction, a power of two: one 4x4 stride-2 conv per factor 2")
    codebook_size: int = option(512, "K")
    codebook_dim: int = option(64, "D")
    commitment_weight: float = option(0.25, "beta, on ||z_e - sg[e]||^2 (never on the codebook term)")
    decay: float | None = option(0.99, "EMA decay gamma; None learns the codebook by the codebook loss term")
    epsilon: float = option(1e-5, "Laplace smoothing of EMA cluster sizes")
    kmeans_init: bool = option(False, "initialise the codebook by k-means on the first training batch")
    kmeans_iters: int = 10
    dead_code_window: int = option(
        0, "restart codes unused for this many training forward passes (micro-batches); 0: never"
    )
    # Options beyond the paper (its VQ above is the default and unchanged):
    quantizer: Literal["vq", "fsq"] = option("vq", "fsq: finite scalar quantization (Mentzer et al. 2023), no codebook")
    fsq_levels: list[int] | None = option(None, "fsq: levels per dimension, e.g. [8, 5, 5, 5]; K is their product")
    lookup_dim: int | None = option(None, "look codes up in this many dimensions (projected down and back up)")
    l2_normalize: bool = option(False, "cosine-similarity lookup: l2-normalised inputs and codes (ViT-VQGAN)")
    straight_through: Literal["ste", "rotation"] = option("ste", "rotation: the rotation trick (Fifty et al. 2024)")
    codebook_transform: Literal["none", "linear"] = option(
        "none", "linear: SimVQ, a frozen codebook under a learned linear map"
    )
    # The network. vqvae: the paper's (above: hidden_channels, res_channels, num_res_blocks). vqgan: the field's
    # encoder/decoder (taming's VQGAN, LlamaGen, latent-diffusion's VQ-f*), diffusers' modules (stage1_vqvae/vqgan.py).
    arch: Literal["vqvae", "vqgan"] = option("vqvae", "vqgan: diffusers' Encoder/Decoder (GroupNorm, SiLU, attention)")
    block_out_channels: list[int] | None = option(
        None, "vqgan: channels per level (taming's ch x ch_mult); one level per factor 2 of downsample, plus one"
    )
    layers_per_block: int = option(2, "vqgan: residual blocks per level in the encoder (the decoder has one more)")
    attn_resolutions: list[int] | None = option(
        None, "vqgan: attention in the levels at these pixel sizes; null: the code grid's (taming: [16] at f16)"
    )
    mid_block_attention: bool = option(True, "vqgan: self-attention in the middle blocks")
    latent_channels: int | None = option(
        None, "vqgan: encoder output channels before the 1x1 to codebook_dim (taming's z_channels); null: D"
    )
    norm_num_groups: int = option(32, "vqgan: GroupNorm groups; must divide every block_out_channels")
    pixel_range: list[float] = option(
        [-1.0, 1.0], "[low, high] the network reads and writes pixels in (aMUSEd's: [0, 1]); vqgen maps its [-1, 1]"
    )

    def __post_init__(self):
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size (K) must be >= 2, got {self.codebook_size}")
        for name in ("in_channels", "image_size", "hidden_channels", "res_channels", "codebook_dim", "downsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 0 or self.dead_code_window < 0 or self.kmeans_iters < 0:
            raise ValueError("num_res_blocks, dead_code_window and kmeans_iters must be >= 0")
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} (data.resolution) is not divisible by downsample {self.downsample}"
            )
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1) or null, got {self.decay}")
        if self.commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {self.commitment_weight}")
        if self.lookup_dim is not None and self.lookup_dim < 1:
            raise ValueError(f"lookup_dim must be positive or null, got {self.lookup_dim}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
                raise ValueError("quantizer fsq needs fsq_levels, each >= 2, e.g. [8, 5, 5, 5]")
            codebook_options = dict(
                lookup_dim=self.lookup_dim is not None,
                l2_normalize=self.l2_normalize,
                straight_through=self.straight_through != "ste",
                codebook_transform=self.codebook_transform != "none",
                kmeans_init=self.kmeans_init,
                dead_code_window=self.dead_code_window > 0,
            )
            if any(codebook_options.values()):
                used = [k for k, v in codebook_options.items() if v]
                raise ValueError(f"quantizer fsq has no codebook, so {used} make no sense with it; drop them")
            self.codebook_size = math.prod(self.fsq_levels)  # K and D follow the levels
            self.codebook_dim = len(self.fsq_levels)
        elif self.fsq_levels is not None:
            raise ValueError("fsq_levels is set but quantizer is vq; set quantizer: fsq or drop fsq_levels")
        check_network(self)
        if len(self.pixel_range) != 2 or not self.pixel_range[0] < self.pixel_range[1]:
            raise ValueError(f"pixel_range must be [low, high] with low < high, got {self.pixel_range}")
        if self.codebook_transform == "linear" and self.decay is not None:
            raise ValueError("codebook_transform linear (SimVQ) learns its map by gradient: set decay null (no EMA)")
        if self.codebook_transform == "linear" and (self.kmeans_init or self.dead_code_window):
            raise ValueError(
                "codebook_transform linear keeps its codebook frozen: drop kmeans_init and dead_code_window"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def level_sizes(self) -> list[int]:
        """vqgan: the side in pixels at which each level of the encoder works (the decoder's, reversed)."""
        return [self.image_size >> i for i in range(len(self.block_out_channels or []))]


def check_network(cfg: VQVAEConfig) -> None:
    """Refuse, at config time, what the chosen network cannot build (one line that names the fix)."""
    vqgan_keys = ("block_out_channels", "attn_resolutions", "latent_channels")
    if cfg.arch == "vqvae":
        used = [k for k in vqgan_keys if getattr(cfg, k) is not None]
        if used:
            raise ValueError(f"{used} configure the vqgan network: set model.arch: vqgan, or drop them")
        return
    channels = cfg.block_out_channels
    if not channels or any(c < 1 for c in channels):
        raise ValueError(
            "arch vqgan needs block_out_channels, one positive width per level, e.g. [128, 128, 256, 256, 512] "
            "(taming's ch 128 x ch_mult 1,1,2,2,4)"
        )
    factor = 2 ** (len(channels) - 1)  # every level but the last halves the resolution
    if factor != cfg.downsample:
        raise ValueError(
            f"block_out_channels has {len(channels)} levels, so the vqgan network downsamples by {factor}, but "
            f"downsample is {cfg.downsample}: set model.downsample: {factor}, or give log2(downsample) + 1 levels"
        )
    if cfg.norm_num_groups < 1 or any(c % cfg.norm_num_groups for c in channels):
        raise ValueError(
            f"norm_num_groups {cfg.norm_num_groups} does not divide every block_out_channels {channels} "
            "(GroupNorm needs it): change one or the other"
        )
    if cfg.layers_per_block < 1 or (cfg.latent_channels is not None and cfg.latent_channels < 1):
        raise ValueError("layers_per_block and latent_channels must be positive")
    sizes = cfg.level_sizes
    stray = sorted(set(cfg.attn_resolutions or []) - set(sizes))
    if stray:
        raise ValueError(f"attn_resolutions {stray} are not level sizes of this network; its levels are {sizes} px")

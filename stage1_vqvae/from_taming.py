"""A taming-transformers or latent-diffusion VQGAN checkpoint (`vqgan_imagenet_f16_1024`, `..._16384`, LDM's
`vq-f4`/`vq-f8`/`vq-f16`) with its config YAML, as a vqgen stage 1 on the vqgan network.

Both projects' Encoder/Decoder are the modules diffusers' `Encoder`/`Decoder` re-implement; their weights are
renamed into VQModel's names by the explicit rules below (every key consumed or named as dropped), then loaded by
`from_diffusers.build`. Dropped: the training losses (`loss.*`: LPIPS and the discriminator), an EMA quantizer's
statistics (`quantize.cluster_size`, `quantize.embed_avg`), and, when the checkpoint holds EMA weights
(latent-diffusion's `model_ema.*`), the raw weights they stand in for. The YAML is read as data
(`model.params`): its `target` classes are never imported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import yaml

from stage1_vqvae.from_diffusers import build, vqgen_config
from stage1_vqvae.model import VQVAE
from stage1_vqvae.pickled import load_tensors, tensors_only
from vqgen.cli import VqgenError

logger = logging.getLogger(__name__)

ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
KEPT = r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+|quantize\.embedding\.weight"  # same names
DROPPED = ("loss.", "quantize.cluster_size", "quantize.embed_avg", "model_ema.decay", "model_ema.num_updates")


def vqmodel_config(params: dict) -> dict:
    """The VQModel config of taming's `model.params` (`ddconfig`, `n_embed`, `embed_dim`)."""
    dd = params.get("ddconfig")
    if not isinstance(dd, dict) or "n_embed" not in params or "embed_dim" not in params:
        raise VqgenError("the config has no model.params.ddconfig / n_embed / embed_dim: is it a taming VQGAN config?")
    if dd.get("double_z") or dd.get("give_pre_end") or dd.get("tanh_out"):
        raise VqgenError("double_z, give_pre_end and tanh_out VQGANs are not nearest-code tokenizers vqgen can import")
    sizes = [dd["resolution"] >> i for i in range(len(dd["ch_mult"]))]  # each level's side, as taming counts it
    attn = set(dd.get("attn_resolutions") or [])
    return dict(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        down_block_types=["AttnDownEncoderBlock2D" if s in attn else "DownEncoderBlock2D" for s in sizes],
        up_block_types=["AttnUpDecoderBlock2D" if s in attn else "UpDecoderBlock2D" for s in reversed(sizes)],
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"],
        norm_num_groups=32, sample_size=dd["resolution"],  # taming's Normalize is GroupNorm(32, eps=1e-6)
    )  # fmt: skip


def block_param(rest: str) -> str:
    """A resnet's or attention's own parameter name in diffusers' terms."""
    head, _, tail = rest.partition(".")
    if head in ATTENTION:
        return f"{ATTENTION[head]}.{tail}"
    return rest.replace("nin_shortcut", "conv_shortcut")


def vqmodel_key(key: str, levels: int) -> str:
    """One taming key in VQModel's name (taming's decoder.up is stored highest resolution first, diffusers'
    up_blocks lowest first)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key):
        part = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[m[2]]
        return f"{m[1]}.mid_block.{part}.{block_param(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.{'resnets' if m[2] == 'block' else 'attentions'}.{m[3]}.{block_param(m[4])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
        up = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{up}.{'resnets' if m[2] == 'block' else 'attentions'}.{m[3]}.{block_param(m[4])}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if re.fullmatch(KEPT, key):
        return key
    raise VqgenError(f"the checkpoint has a tensor vqgen has no rule for: {key}")


def renamed(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    """`state` under `rename(key)` (VQModel's names), 1x1-conv attention weights squeezed to linear ones; shared with
    from_llamagen.py, whose layout is taming's under other names."""
    out = {}
    for key, tensor in state.items():
        name = rename(key)
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", name):
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear: the same map on each pixel
        out[name] = tensor
    return out


def model_weights(checkpoint: dict, use_ema: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """The model's own tensors (losses and quantizer statistics dropped), the EMA copy where there is one."""
    state = tensors_only(checkpoint.get("state_dict", checkpoint))
    if any(k.startswith("quantize.proj.") or k.startswith("quantize.embed.") for k in state):
        raise VqgenError(
            "this is a Gumbel-softmax VQGAN (taming's vqgan_gumbel_f8): it picks codes by the argmax of learned "
            "logits, not by the nearest code, which vqgen's quantizer and diffusers' VQModel cannot express"
        )
    own = {k: v for k, v in state.items() if not k.startswith(DROPPED) and not k.startswith("model_ema.")}
    ema = {k: state["model_ema." + k.replace(".", "")] for k in own if "model_ema." + k.replace(".", "") in state}
    if use_ema and ema:
        own.update(ema)
    return own, bool(use_ema and ema)


def import_taming(checkpoint: Path, config: Path, resolution: int | None, pixel_range: list[float], use_ema: bool):
    """(vqgen model, whether EMA weights were used) of a taming/LDM checkpoint and its config YAML."""
    try:
        params = (yaml.safe_load(Path(config).read_text()) or {})["model"]["params"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise VqgenError(f"--config {config}: not a readable taming/LDM config with model.params ({e})") from None
    vc = vqmodel_config(params)
    config = vqgen_config(vc, resolution, pixel_range)  # refuses what cannot be built before the checkpoint is read
    weights, ema_used = model_weights(load_tensors(Path(checkpoint)), use_ema)
    if ema_used:
        logger.info("the checkpoint holds EMA weights (model_ema.*): using them, as latent-diffusion does")
    levels = len(vc["block_out_channels"])
    model: VQVAE = build(config, renamed(weights, lambda k: vqmodel_key(k, levels)))
    return model, ema_used

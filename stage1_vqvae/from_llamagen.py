"""A LlamaGen VQ checkpoint (`vq_ds16_c2i.pt`: VQ-16; `vq_ds8_c2i.pt`: VQ-8), as a vqgen stage 1 on the vqgan network.

LlamaGen's tokenizer (FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`) is taming's network under
other module names: `conv_blocks.{i}.res/attn/downsample|upsample`, `mid.{0,1,2}` (resnet, attention, resnet),
attention only at the lowest resolution, the decoder's blocks stored lowest resolution first (diffusers' order).
Its geometry is read from the tensor shapes (widths, levels, residual blocks, K, the code dimension), so VQ-16 and
VQ-8 need no flag. Its quantizer l2-normalises the latents and the codebook before the argmin (`codebook_l2_norm`,
on in every released model): that is vqgen's `l2_normalize` lookup. The weights are the checkpoint's `model`, or its
`ema` with `--ema on`; `quantize.codebook_used` (a usage counter of training) is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stage1_vqvae.from_diffusers import build, vqgen_config
from stage1_vqvae.from_taming import KEPT, block_param, renamed
from stage1_vqvae.model import VQVAE
from stage1_vqvae.pickled import load_tensors, tensors_only
from vqgen.cli import VqgenError

DROPPED = ("quantize.codebook_used",)


def geometry(state: dict[str, torch.Tensor]) -> dict:
    """The VQModel config of a LlamaGen state dict, from its shapes."""
    try:
        levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
        widths = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] for i in range(levels)]
        blocks = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
        k, d = state["quantize.embedding.weight"].shape
        latent = state["quant_conv.weight"].shape[1]
        channels = state["encoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise VqgenError(
            f"not a LlamaGen VQ state dict (no {e}; LlamaGen's has encoder.conv_blocks.*); a taming or "
            "latent-diffusion checkpoint needs --config with its YAML"
        ) from None
    lowest = ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"]  # attention at the last level only
    return dict(
        in_channels=channels, out_channels=state["decoder.conv_out.weight"].shape[0], down_block_types=lowest,
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1), block_out_channels=widths,
        layers_per_block=blocks, latent_channels=latent, num_vq_embeddings=k, vq_embed_dim=d, norm_num_groups=32,
        sample_size=256,  # LlamaGen's tokenizers are trained on 256 px crops
    )  # fmt: skip


def vqmodel_key(key: str) -> str:
    """One LlamaGen key in VQModel's name."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.([012])\.(.+)", key):
        part = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[m[2]]
        return f"{m[1]}.mid_block.{part}.{block_param(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn)\.(\d+)\.(.+)", key):
        blocks = "down_blocks" if m[1] == "encoder" else "up_blocks"
        return f"{m[1]}.{blocks}.{m[2]}.{'resnets' if m[3] == 'res' else 'attentions'}.{m[4]}.{block_param(m[5])}"
    if m := re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{m[1]}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if re.fullmatch(KEPT, key):
        return key
    raise VqgenError(f"the checkpoint has a tensor vqgen has no rule for: {key}")


def import_llamagen(checkpoint: Path, resolution: int | None, pixel_range: list[float], use_ema: bool) -> VQVAE:
    data = load_tensors(checkpoint)
    if use_ema and "ema" not in data:
        raise VqgenError(f"{checkpoint} has no 'ema' weights (it has {sorted(data)}); drop --ema on")
    part = "ema" if use_ema else next((p for p in ("model", "state_dict") if p in data), None)
    state = tensors_only(data[part] if part else data)
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    config = vqgen_config(geometry(state), resolution, pixel_range, l2_normalize=True)
    return build(config, renamed(state, vqmodel_key))

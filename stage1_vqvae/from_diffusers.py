"""A diffusers `VQModel` (aMUSEd's VQGAN, VQ-Diffusion's, latent-diffusion's VQ-f4 on the Hub, or any saved with
`save_pretrained`) as a vqgen stage 1 on the vqgan network: the config mapped key by key, every weight placed.

VQModel's modules are the vqgan network's (`vqgan.py`), so the weights move by renaming alone; its quantizer is a
nearest-code lookup (argmin of `cdist` to `quantize.embedding.weight`), which is vqgen's fused VQ with that
codebook. The `lookup_from_codebook` flag changes only how VQModel.decode is called, not the weights. MoVQ's
`norm_type="spatial"` (a decoder conditioned on the codes) is not diffusers' plain Decoder and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from stage1_vqvae.model import VQVAE, VQVAEConfig
from stage1_vqvae.vqgan import SHARED_PREFIXES
from vqgen.cli import VqgenError

ENCODER_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # type -> has attention
DECODER_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
IGNORED = {"sample_size", "scaling_factor", "force_upcast", "lookup_from_codebook", "_class_name",
           "_diffusers_version", "_name_or_path", "_use_default_values"}  # fmt: skip
KNOWN = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
         "layers_per_block", "act_fn", "latent_channels", "num_vq_embeddings", "norm_num_groups", "vq_embed_dim",
         "norm_type", "mid_block_add_attention"}  # fmt: skip


def vqgen_config(vc: dict, resolution: int | None, pixel_range: list[float], **options) -> VQVAEConfig:
    """The VQVAEConfig of the vqgan network that VQModel config `vc` describes (refusing what it cannot express)."""
    unknown = sorted(set(vc) - KNOWN - IGNORED)
    if unknown:
        raise VqgenError(f"the VQModel config has keys vqgen does not know how to map: {unknown}")
    if vc.get("norm_type", "group") != "group":
        raise VqgenError(
            f"norm_type {vc['norm_type']!r} (MoVQ's spatial norm conditions the decoder on the codes) is not the "
            "plain VQGAN decoder vqgen builds; only norm_type 'group' VQModels can be imported"
        )
    if vc.get("act_fn", "silu") != "silu" or vc["in_channels"] != vc["out_channels"]:
        raise VqgenError("only VQModels with act_fn silu and out_channels == in_channels can be imported")
    down, up, channels = list(vc["down_block_types"]), list(vc["up_block_types"]), list(vc["block_out_channels"])
    if any(t not in ENCODER_BLOCKS for t in down) or any(t not in DECODER_BLOCKS for t in up):
        known = [*ENCODER_BLOCKS, *DECODER_BLOCKS]
        raise VqgenError(f"block types {down} / {up}: vqgen maps only {known}")
    levels = len(channels)
    encoder_attention = [ENCODER_BLOCKS[t] for t in down]
    decoder_attention = [DECODER_BLOCKS[t] for t in reversed(up)]  # up blocks run from the lowest resolution
    if len(down) != levels or len(up) != levels:
        raise VqgenError(
            f"the VQModel lists {len(down)} down and {len(up)} up block types for {levels} block_out_channels: "
            "diffusers builds one block per type, so its config is inconsistent"
        )
    if encoder_attention != decoder_attention:
        raise VqgenError(
            f"attention at other levels in the encoder ({down}) than in the decoder ({up}): vqgen's vqgan network "
            "puts it at the same levels in both"
        )
    size = resolution or vc.get("sample_size")
    if not isinstance(size, int):
        raise VqgenError("the VQModel config has no sample_size: pass --resolution, the side of the images to encode")
    try:
        return VQVAEConfig(
            in_channels=vc["in_channels"], image_size=size, arch="vqgan", block_out_channels=channels,
            layers_per_block=vc["layers_per_block"], downsample=2 ** (levels - 1),
            attn_resolutions=[size >> i for i, attn in enumerate(encoder_attention) if attn],
            mid_block_attention=vc.get("mid_block_add_attention", True), latent_channels=vc["latent_channels"],
            norm_num_groups=vc["norm_num_groups"], codebook_size=vc["num_vq_embeddings"],
            codebook_dim=vc.get("vq_embed_dim") or vc["latent_channels"], decay=None, pixel_range=pixel_range,
            **options,
        )  # fmt: skip
    except ValueError as e:
        raise VqgenError(f"the VQModel cannot be built as vqgen's vqgan network at {size} px: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """diffusers' weights file: safetensors, or a .bin read with `weights_only` (tensors only, no code runs)."""
    safe = folder / "diffusion_pytorch_model.safetensors"
    if safe.is_file():
        return load_file(str(safe))
    pickled = folder / "diffusion_pytorch_model.bin"
    if pickled.is_file():
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same one-line refusal
            raise VqgenError(
                f"{pickled} holds more than tensors ({type(e).__name__}); re-save it as safetensors with "
                "VQModel.from_pretrained(...).save_pretrained(folder, safe_serialization=True)"
            ) from None
    raise VqgenError(f"{folder} has no diffusion_pytorch_model.safetensors (or .bin): is it a VQModel folder?")


def vqgen_state(vq_state: dict[str, torch.Tensor], model: VQVAE) -> dict[str, torch.Tensor]:
    """VQModel's tensors in vqgen's names; every source tensor used, every vqgen tensor but the quantizer's
    bookkeeping (`initted`, `code_age`, kept at their initial values) given."""
    reverse = {theirs: ours for ours, theirs in SHARED_PREFIXES.items()}
    state, left = {}, []
    for key, tensor in vq_state.items():
        prefix = next((p for p in reverse if key.startswith(p)), None)
        if prefix is not None:
            state[reverse[prefix] + key[len(prefix) :]] = tensor
        elif key == "quantize.embedding.weight":
            state["quantizer.embed"] = tensor
        else:
            left.append(key)
    if left:
        raise VqgenError(f"the VQModel weights have tensors vqgen has no place for: {left[:5]}")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state) - {"quantizer.initted", "quantizer.code_age"})
    if missing:
        raise VqgenError(f"the VQModel weights lack tensors the network needs: {missing[:5]}")
    for key in ("quantizer.initted", "quantizer.code_age"):
        state[key] = ours[key]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build(config: VQVAEConfig, vq_state: dict) -> VQVAE:
    """vqgen's model of a config (`vqgen_config`) and weights in VQModel's names; the converters of other formats
    (from_taming.py, from_llamagen.py) rename into those names and come here."""
    model = VQVAE(config)
    try:
        model.load_state_dict(vqgen_state(vq_state, model), strict=True)
    except RuntimeError as e:
        raise VqgenError(f"the weights do not fit the tokenizer's config: {str(e)[:300]}") from None
    return model.eval()


def import_vqmodel(folder: Path, resolution: int | None, pixel_range: list[float]) -> VQVAE:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise VqgenError(f"{folder} has no config.json: is it a diffusers VQModel folder (or its subfolder)?")
    vc = json.loads(config_file.read_text())
    if vc.get("_class_name", "VQModel") != "VQModel":
        raise VqgenError(f"{folder} holds a diffusers {vc['_class_name']}, not a VQModel")
    config = vqgen_config(vc, resolution, pixel_range)  # refuses what cannot be built before any weights are read
    return build(config, read_weights(folder))

"""Write a vqgan-network stage 1 as a folder that `diffusers.VQModel.from_pretrained` loads, and vqgen too.

    python -m stage1_vqvae.export_diffusers --model runs/ffhq256/stage1/model --output_dir runs/ffhq256/vqmodel \\
        [--push_to_hub --hub_model_id user/ffhq256-vq-f16]

The folder holds diffusers' `config.json` + `diffusion_pytorch_model.safetensors` (a VQModel with this network's
weights and codebook), vqgen's `vqgen.json` (the vqgen config, the preprocessing of the training images, where
the weights came from) and `vqgen_extra.safetensors` (the quantizer's statistics and whatever VQModel holds
folded), and a card that says how to get codes and images out of the VQModel. `VQVAE.from_pretrained(folder)`
gives back the exported model bit for bit.

What VQModel can express is a nearest-code lookup in an explicit codebook, behind 1x1 convs: the paper's VQ with
or without EMA, k-means init, restarts and the rotation trick (they change training, not the lookup); a low-dim
lookup (its projections are linear: folded into quant_conv / post_quant_conv); an l2-normalised lookup (VQModel
compares unnormalised z_e with the normalised codes: ||z - e||^2 = ||z||^2 - 2 z.e + 1 with ||e|| = 1, whose argmin
over e is the cosine one's); SimVQ (its map baked into an explicit codebook). FSQ has no codebook and the paper's
network is not diffusers' Encoder/Decoder: both are refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from stage1_vqvae.model import VQVAE
from stage1_vqvae.vqgan import DIFFUSERS_WEIGHTS, EXPORT_FILE, EXTRA_WEIGHTS, to_vqmodel_key, vqmodel_config
from vqgen.cli import VqgenError, launch_state, refuse_existing, run_cli
from vqgen.files import atomic_dir, commit_dir
from vqgen.hub import upload_folder

CARD = """---
library_name: diffusers
tags: [vq-vae, vqgan, image-tokenizer, vqgen]
---

# {title}

A VQGAN-network image tokenizer trained with [vqgen](https://github.com/vqgen/vqgen), saved as a
`diffusers.VQModel`: {size}x{size} images with {channels} channel(s) -> a {grid}x{grid} grid of codes
from K={k} codes of dimension {d}. The VQModel takes and gives pixels in {pixel_range}.

## Codes and images with diffusers

`VQModel.encode` returns the latents *before* quantization; the codes are the quantizer's nearest-code indices:

```python
import torch
from diffusers import VQModel

vq = VQModel.from_pretrained("{where}")
with torch.no_grad():
    latents = vq.encode(images).latents                   # images (B, {channels}, {size}, {size}) in {pixel_range}
    _, _, (_, _, codes) = vq.quantize(latents)            # (B*{grid}*{grid},) nearest-code indices
    codes = codes.view(len(images), {grid}, {grid})       # (B, h, w) int64
    decoded = vq.decode(codes.flatten(), force_not_quantize=True,
                        shape=(len(images), {grid}, {grid}, {d})).sample  # (B, {channels}, {size}, {size})
```

`vq(images).sample` quantizes and decodes in one call. {lookup_note}

## The same model in vqgen

```python
from stage1_vqvae.model import VQVAE

vqvae = VQVAE.from_pretrained("{where}")  # bit for bit the exported model, with its training preprocessing
codes = vqvae.encode(images); images = vqvae.decode_codes(codes)
```

`vqgen.json` holds vqgen's config (images are mapped from [-1, 1] to `pixel_range` {pixel_range} on the way in),
the training images' preprocessing and the provenance below;
`vqgen_extra.safetensors` the quantizer's statistics (EMA, code ages) that a VQModel has no place for.

Provenance: `{source}`.
"""


def check_exportable(model: VQVAE) -> None:
    """Refuse (one line, nothing written) a model that VQModel cannot express."""
    c = model.config
    if c.quantizer == "fsq":
        raise VqgenError(
            "quantizer fsq cannot be exported to diffusers: FSQ rounds each dimension and has no codebook, and "
            "diffusers.VQModel's quantizer is a nearest-code lookup in one; use it with vqgen's VQVAE"
        )
    if c.arch != "vqgan":
        raise VqgenError(
            f"model.arch {c.arch} (the 2017 paper's network) is not diffusers' Encoder/Decoder; only an arch vqgan "
            "stage 1 can be exported to diffusers.VQModel: train one with model.arch=vqgan"
        )


def _compose(outer_w, outer_b, inner_w, inner_b) -> tuple[torch.Tensor, torch.Tensor]:
    """outer(inner(x)) of two affine maps as one: weights (out, mid) @ (mid, in), in float64 then float32."""
    w = outer_w.double() @ inner_w.double()
    b = outer_w.double() @ inner_b.double() + (outer_b.double() if outer_b is not None else 0.0)
    return w.float(), b.float()


def vqmodel_state(model: VQVAE) -> dict[str, torch.Tensor]:
    """The model's weights in VQModel's names, the quantizer folded into quant_conv, codebook, post_quant_conv."""
    state = {}
    for key, tensor in model.state_dict().items():
        theirs = to_vqmodel_key(key)
        if theirs is not None:
            state[theirs] = tensor.detach().float().contiguous()
    q = model.quantizer
    with torch.no_grad():
        state["quantize.embedding.weight"] = q.codebook().detach().float().contiguous()  # (K, d), SimVQ baked
        if q.projected:  # 1x1 conv then a linear map: one 1x1 conv, in and out
            qw, qb = state["quant_conv.weight"][:, :, 0, 0], state["quant_conv.bias"]  # (D, latent), (D,)
            w, b = _compose(q.project_in.weight, q.project_in.bias, qw, qb)  # (d, latent)
            state["quant_conv.weight"], state["quant_conv.bias"] = w[:, :, None, None].contiguous(), b
            pw, pb = state["post_quant_conv.weight"][:, :, 0, 0], state["post_quant_conv.bias"]  # (latent, D)
            w, b = _compose(pw, pb, q.project_out.weight, q.project_out.bias)  # (latent, d)
            state["post_quant_conv.weight"], state["post_quant_conv.bias"] = w[:, :, None, None].contiguous(), b
    return state


def extra_state(model: VQVAE, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vqgen's tensors that the VQModel file does not hold bit for bit (what loading back overlays)."""
    extra = {}
    for key, tensor in model.state_dict().items():
        theirs = to_vqmodel_key(key)
        if theirs is None or not torch.equal(state[theirs], tensor):
            extra[key] = tensor.detach().contiguous()
    return extra


def export(model: VQVAE, output_dir: Path, source: str = "", repo_id: str | None = None) -> Path:
    """Write `model` as a diffusers.VQModel folder with vqgen's metadata (atomically: all of it or nothing)."""
    from diffusers import VQModel

    check_exportable(model)
    c = model.config
    lookup_dim = model.quantizer.lookup_dim
    state = vqmodel_state(model)
    vq = VQModel(**vqmodel_config(c, lookup_dim))
    vq.load_state_dict(state, strict=True)  # every tensor placed, none left over
    tmp = atomic_dir(output_dir)
    try:
        vq.save_pretrained(tmp, safe_serialization=True)
        assert (tmp / DIFFUSERS_WEIGHTS).is_file()
        save_file(extra_state(model, state), str(tmp / EXTRA_WEIGHTS))
        meta = dict(model_config=asdict(c), data_config=model.data_config, provenance=dict(source=source),
                    tokenizer_source=model.tokenizer_source)  # fmt: skip
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        note = (
            "The codebook is l2-normalised: VQModel's Euclidean lookup on unnormalised latents picks the same code "
            "as vqgen's cosine lookup."
            if c.l2_normalize
            else ""
        )
        card = CARD.format(
            title=f"{output_dir.name} (vqgen VQGAN tokenizer)", size=c.image_size, channels=c.in_channels,
            grid=c.grid_size, k=c.codebook_size, d=lookup_dim, where=repo_id or str(output_dir), lookup_note=note,
            source=source or "unknown", pixel_range=c.pixel_range,
        )  # fmt: skip
        ModelCard(card).save(tmp / "README.md")
        commit_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a vqgen stage-1 folder (model.arch vqgan) or Hub repo id")
    parser.add_argument("--output_dir", required=True, help="the diffusers.VQModel folder to write")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="the Hub repo for --push_to_hub (owner/name)")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise VqgenError("--push_to_hub needs --hub_model_id owner/name")
    # Under a launcher every rank checks (the same errors everywhere), then the main process alone writes: two ranks
    # writing one folder race (issue 36's export finding).
    state = launch_state()
    out = Path(args.output_dir)
    refuse_existing(out, args.overwrite_output_dir)
    model = VQVAE.from_pretrained(args.model)
    check_exportable(model)
    state.wait_for_everyone()
    if state.is_main_process:
        export(model, out, source=str(args.model), repo_id=args.hub_model_id)
        print(f"saved a diffusers.VQModel ({model.config.codebook_size} codes) and vqgen's metadata to {out}")
        if args.push_to_hub:
            print(upload_folder(out, args.hub_model_id, private=args.hub_private_repo or None))
    state.wait_for_everyone()
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()

"""The VQ-VAE of van den Oord et al. 2017 ("Neural Discrete Representation Learning"), read top to bottom: encoder,
decoder, the model and its loader; its config is in `configuration.py` (re-exported here), its quantizers beside
it in `quantizers.py`, the field's VQGAN network (`model.arch: vqgan`) in `vqgan.py`.

    encoder:  x -> [4x4 stride-2 conv, ReLU] * log2(downsample) -> 3x3 conv -> residual blocks -> ReLU -> 1x1 -> z_e
    quantize: k = argmin_j ||z_e - e_j||^2,  z_q = e_k  (straight-through: the encoder receives dL/dz_q)
    decoder:  z_q -> 3x3 conv -> residual blocks -> ReLU -> [4x4 stride-2 transposed conv] * log2(downsample) -> x

Loss (paper, eq. 3): -log p(x|z_q) + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2, beta = commitment_weight = 0.25.
With a Gaussian decoder of fixed variance the first term is the MSE up to constants. Every reduction is a mean
over elements, so beta keeps its meaning whatever D is. The codebook term is used when `decay is None`;
otherwise the codebook follows the EMA update of the paper's appendix A.1 and only the commitment term enters
the loss.

The EMA formulas and Laplace smoothing are Sonnet's (VectorQuantizerEMA). It differs from Sonnet v2 in two ways:
z_q is looked up in the codebook *after* this batch's EMA update (Sonnet uses the codebook before it), and the
statistics start from the initial codebook (cluster sizes 1) without Sonnet's zero-debiasing, so an unused code
keeps its vector instead of decaying towards 0. The EMA, k-means init and the dead-code counter advance once per
training forward pass, i.e. per micro-batch under gradient accumulation: with A accumulation steps the decay per
optimizer step is decay^A, and `dead_code_window` counts micro-batches.

Under several processes the EMA statistics are all-reduced, k-means init clusters the encoder outputs of every
rank (gathered), and its result and the dead-code restarts are broadcast from rank 0, so every rank holds the
same codebook (DDP's buffer broadcast alone would throw away every rank's statistics but rank 0's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from stage1_vqvae.configuration import VQVAEConfig
from stage1_vqvae.quantizers import build_quantizer
from stage1_vqvae.vqgan import VQGANDecoder, VQGANEncoder, read_diffusers_export
from vqgen.cli import VqgenError
from vqgen.hub import load_safetensors_model, resolve_folder

# --------------------------------------------------------------------------------------------------
# Encoder / decoder


class ResidualBlock(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x)))), the paper's residual block."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x)), inplace=True))  # x itself is needed for the skip


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_down = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = []
        ch = cfg.in_channels
        # In-place ReLUs: a conv keeps its input for backward, not its output, so overwriting the output saves
        # a copy of the largest activations (the full-resolution ones of big images) at no change in the numbers.
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, cfg.hidden_channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            ch = cfg.hidden_channels
        layers.append(nn.Conv2d(ch, cfg.hidden_channels, 3, padding=1))
        layers += [ResidualBlock(cfg.hidden_channels, cfg.res_channels) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(inplace=True), nn.Conv2d(cfg.hidden_channels, cfg.codebook_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, D, H/ds, W/ds)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_up = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, cfg.hidden_channels, 3, padding=1)]
        layers += [ResidualBlock(cfg.hidden_channels, cfg.res_channels) for _ in range(cfg.num_res_blocks)]
        layers.append(nn.ReLU(inplace=True))  # in place, as in the encoder
        for i in range(n_up):
            last = i == n_up - 1
            out = cfg.in_channels if last else cfg.hidden_channels
            layers.append(nn.ConvTranspose2d(cfg.hidden_channels, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        if n_up == 0:
            layers.append(nn.Conv2d(cfg.hidden_channels, cfg.in_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.net[-1].weight  # where the adversarial loss's adaptive weight is measured

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)  # (B, D, h, w) -> (B, C, h*ds, w*ds)


# --------------------------------------------------------------------------------------------------
# The VQ-VAE


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W), in the [-1, 1] scale of the input
    codes: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # recon_loss + quantizer loss: what training minimises
    recon_loss: torch.Tensor  # MSE, the Gaussian -log p(x|z_q) up to constants
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    dead_codes: torch.Tensor
    counts: torch.Tensor = field(repr=False, default=None)


MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title | default("VQ-VAE", true) }}

A VQ-VAE (van den Oord et al. 2017, [arXiv:1711.00937](https://arxiv.org/abs/1711.00937)) trained with
[vqgen]({{ repo_url | default("https://github.com/vqgen/vqgen", true) }})
{%- if network %}, on {{ network }}{% endif %}. It maps a
{{ image_size }}x{{ image_size }} image with {{ in_channels }} channel(s) to a {{ grid }}x{{ grid }} grid of
codes from a codebook of K={{ codebook_size }} vectors of dimension {{ codebook_dim }}.

{% if training_data %}Training data: `{{ training_data }}`.{% endif %}
{% if imported_from %}{{ imported_from }}{% endif %}

{% if metrics %}## Evaluation

| metric | value |
|---|---|
{% for k, v in metrics.items() %}| {{ k }} | {{ v }} |
{% endfor %}{% endif %}
{% if image %}![reconstructions: originals (top) and reconstructions (bottom)]({{ image }}){% endif %}

## Use

```python
from stage1_vqvae.model import VQVAE
{% if repo_id %}vqvae = VQVAE.from_pretrained("{{ repo_id }}")
{% else %}vqvae = VQVAE.from_pretrained(folder)  # this folder, or the Hub repo it is published to
{% endif %}codes = vqvae.encode(images)           # images (B, C, H, W) in [-1, 1] -> (B, h, w) int64
images = vqvae.decode_codes(codes)     # back to (B, C, H, W)
```
"""


SOURCE_FILE = "tokenizer_source.json"  # an imported tokenizer's provenance, beside its weights


def imported_from(source: dict) -> str:
    """One paragraph on an imported tokenizer's provenance, for the cards of its folder and of pipelines over it."""
    digest = f"sha256 {source['weights_sha256'][:16]}…" if source.get("weights_sha256") else "no digest"
    where = f" (subfolder `{source['subfolder']}`)" if source.get("subfolder") else ""
    revision = f" at revision `{source['revision']}`" if source.get("revision") else ""
    return (
        f"Imported from `{source['source']}`{where}{revision}, a {source['kind']}; weights file "
        f"{source.get('weights_file')} ({digest}); license as the source states it: {source['license']}. It takes "
        f"pixels in {source['pixel_range']}. Frozen: used as it is, never retrained by vqgen."
    )


class VQVAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="vqgen",
    repo_url="https://github.com/vqgen/vqgen",
    paper_url="https://arxiv.org/abs/1711.00937",
    pipeline_tag="image-feature-extraction",
    license="apache-2.0",
    tags=["vq-vae", "image-tokenizer", "vqgen"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Encoder, vector quantizer and decoder. Images are (B, C, H, W) in [-1, 1]."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if isinstance(config, dict):
            config = VQVAEConfig(**config)
        self.config = config
        vqgan = config.arch == "vqgan"
        self.encoder = VQGANEncoder(config) if vqgan else Encoder(config)
        self.quantizer = build_quantizer(config)
        self.decoder = VQGANDecoder(config) if vqgan else Decoder(config)
        self.data_config: dict | None = None  # preprocessing of the training images; set by training and loading
        self.tokenizer_source: dict | None = None  # where an imported tokenizer came from (import_tokenizer.py)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_channels, self.config.image_size
        if images.ndim != 4 or images.shape[1] != c or images.shape[-2:] != (s, s):
            raise ValueError(f"expected images of shape (B, {c}, {s}, {s}), got {tuple(images.shape)}")
        # Follow the weights' memory format: channels_last convolutions are ~1.4x faster on CPU.
        if next(self.encoder.parameters()).is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _into_network(self, images: torch.Tensor) -> torch.Tensor:
        """vqgen's [-1, 1] pixels -> the range the network was trained on (the identity for vqgen's own)."""
        lo, hi = self.config.pixel_range
        return images if (lo, hi) == (-1.0, 1.0) else (images + 1) * ((hi - lo) / 2) + lo

    def _out_of_network(self, pixels: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.pixel_range
        return pixels if (lo, hi) == (-1.0, 1.0) else (pixels - lo) * (2 / (hi - lo)) - 1

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        images = self._check_images(images)
        z_e = self.encoder(self._into_network(images))  # (B, D, h, w)
        q = self.quantizer(z_e)
        reconstruction = self._out_of_network(self.decoder(q.z_q.to(z_e.dtype)))  # (B, C, H, W)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        return VQVAEOutput(
            reconstruction=reconstruction,
            codes=q.codes,
            loss=recon_loss + q.loss,
            recon_loss=recon_loss,
            codebook_loss=q.codebook_loss,
            commitment_loss=q.commitment_loss,
            perplexity=q.perplexity,
            usage=q.usage,
            dead_codes=q.dead_codes,
            counts=q.counts,
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, h, w) int64 codes; never touches the codebook statistics."""
        images = self._check_images(images)
        z_e = self.encoder(self._into_network(images)).float()  # (B, D, h, w)
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        return self.quantizer.nearest(flat).view(b, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, C, H, W) images in (about) [-1, 1]."""
        k = self.config.codebook_size
        if codes.ndim != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"codes must lie in [0, {k}); got range [{int(codes.min())}, {int(codes.max())}]")
        z_q = self.quantizer.lookup(codes.long())  # (B, D, h, w)
        param = next(self.decoder.parameters())
        return self._out_of_network(self.decoder(z_q.to(param.dtype)))

    # -- Hub: a card that describes the model, strict safetensors-only loading -----------------------

    def save_pretrained(self, save_directory, *, model_card_kwargs: dict | None = None, **kwargs):
        """PyTorchModelHubMixin.save_pretrained, with the card's geometry filled from the config."""
        c = self.config
        card = dict(image_size=c.image_size, in_channels=c.in_channels, grid=c.grid_size)
        card.update(codebook_size=c.codebook_size, codebook_dim=c.codebook_dim)
        if c.arch == "vqgan":
            card["network"] = (
                f"the VQGAN encoder/decoder (diffusers' modules; channels {c.block_out_channels}); "
                "`python -m stage1_vqvae.export_diffusers` writes it as a `diffusers.VQModel`"
            )
        if self.tokenizer_source is not None:
            card["imported_from"] = imported_from(self.tokenizer_source)
        card.update(model_card_kwargs or {})
        out = super().save_pretrained(save_directory, model_card_kwargs=card, **kwargs)
        if self.data_config is not None:  # the preprocessing of the training images travels with the weights
            (Path(save_directory) / "data_config.json").write_text(json.dumps(self.data_config, indent=2) + "\n")
        if self.tokenizer_source is not None:
            (Path(save_directory) / SOURCE_FILE).write_text(json.dumps(self.tokenizer_source, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VQVAE:
        """Load from a local folder or a Hub repo id (safetensors + config.json only, strict).

        The loaded model carries `data_config`: the preprocessing of its training images (data_config.json),
        or None when the folder has none.
        """
        hub_kwargs = {
            k: kwargs.pop(k)
            for k in ("revision", "cache_dir", "token", "force_download", "local_files_only")
            if kwargs.get(k) is not None
        }
        folder = resolve_folder(
            pretrained_model_name_or_path,
            "model",
            allow_patterns=["*.json", "*.safetensors", "*.md", "*.png"],
            **hub_kwargs,
        )
        exported = read_diffusers_export(folder)  # a folder written for diffusers.VQModel by export_diffusers
        if exported is not None:
            meta, state = exported
            try:
                model = cls(VQVAEConfig(**meta["model_config"]))
                model.load_state_dict(state, strict=True)
            except (TypeError, ValueError, RuntimeError) as e:
                raise VqgenError(f"{folder} is not a loadable vqgen export ({str(e)[:300]})") from None
            model.data_config, model.tokenizer_source = meta.get("data_config"), meta.get("tokenizer_source")
            return model.to(kwargs.get("map_location", "cpu")).eval()
        return super().from_pretrained(str(folder), **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id,
        revision,
        cache_dir,
        force_download,
        local_files_only,
        token,
        map_location="cpu",
        strict=True,
        **model_kwargs,
    ):
        if "config" not in model_kwargs:
            raise VqgenError(f"{model_id} has no config.json; is this a vqgen VQ-VAE folder?")
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError) as e:
            raise VqgenError(f"{model_id}/config.json is not a valid VQ-VAE config ({e})") from None
        data_file = Path(model_id) / "data_config.json"
        model.data_config = json.loads(data_file.read_text()) if data_file.is_file() else None
        source_file = Path(model_id) / SOURCE_FILE
        model.tokenizer_source = json.loads(source_file.read_text()) if source_file.is_file() else None
        return load_safetensors_model(
            model,
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
        )

"""Losses beyond the paper's MSE, as options for natural images (VQGAN, Esser et al. 2021): a perceptual loss
and a PatchGAN discriminator with the hinge loss and VQGAN's adaptive weight. The paper's loss stays the default
(every weight 0) and is then computed exactly as before.

    generator:      L = MSE + quantizer terms + p * perceptual + lambda * a * (-mean D(x_hat))      (after disc_start)
    lambda        = ||grad_W (MSE + p * perceptual)|| / (||grad_W (-mean D(x_hat))|| + 1e-4), clamped to [0, 1e4],
                    W the decoder's last layer (VQGAN's adaptive weight; `adaptive_weight: false` uses 1)
    discriminator:  L_D = (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2              (hinge, after disc_start)

The perceptual loss is LPIPS's (Zhang et al. 2018) distance on VGG16 features (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3): channel-normalised feature differences, squared, weighted per channel by LPIPS's linear
layers when given (`loss.lpips_weights`) or summed, averaged over space, summed over layers: the `lpips`
package's network (vqgen.metrics.lpips, shared with the LPIPS metric). Nothing is ever downloaded: the VGG16
weights come from a file the user points to or the torch hub cache; a missing file is one error that says where to
get it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.cli import VqgenError
from vqgen.config import option


@dataclass
class LossConfig:
    perceptual_weight: float = option(0.0, "p; 0: off (the paper). LlamaGen and VQGAN use 1.0")
    perceptual_weights: str | None = option(None, "VGG16 weights (.pth or .safetensors); null: the torch hub cache")
    lpips_weights: str | None = option(
        None, "LPIPS linear layers (the lpips package's weights/v0.1/vgg.pth); null: unit"
    )
    adversarial_weight: float = option(0.0, "a; 0: off (the paper). VQGAN: 0.8, LlamaGen: 0.5")
    disc_start: int = option(0, "optimizer step at which the discriminator and the adversarial term start")
    disc_layers: int = option(3, "PatchGAN depth: stride-2 4x4 convs after the first (pix2pix's n_layers)")
    disc_channels: int = option(64, "width of the first discriminator conv (doubled per layer, up to 8x)")
    disc_learning_rate: float | None = option(None, "null: train.learning_rate")
    adaptive_weight: bool = option(
        True, "VQGAN's lambda: the adversarial gradient balanced against the reconstruction's"
    )

    def __post_init__(self):
        for name in ("perceptual_weight", "adversarial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError("disc_start must be >= 0, disc_layers and disc_channels positive")

    @property
    def enabled(self) -> bool:
        return self.perceptual_weight > 0 or self.adversarial_weight > 0


# --------------------------------------------------------------------------------------------------
# Perceptual loss


def PerceptualLoss(vgg_weights: str | None = None, lpips_weights: str | None = None) -> nn.Module:
    """LPIPS's VGG16 distance (B,) between two image batches in [-1, 1], frozen; unit channel weights when no
    linear layers are given."""
    from vqgen.metrics.lpips import LPIPS  # the lpips package (and scipy) only when the loss is on
    from vqgen.metrics.standard import VGG16, find_weights

    backbone = find_weights(VGG16, vgg_weights, FLAGS[0], required=True)
    return LPIPS("vgg", backbone, lpips_weights, linear=lpips_weights is not None)


FLAGS = ("loss.perceptual_weights", "loss.lpips_weights")


# --------------------------------------------------------------------------------------------------
# PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017) as VQGAN uses it: 4x4 convs, LeakyReLU 0.2, BatchNorm; one logit per
    overlapping patch. (B, C, H, W) -> (B, 1, h', w')."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            prev, width = width, channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(prev, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def output_side(image_size: int, layers: int) -> int:
        """The side of the logit map (4x4 convs with padding 1: stride 2 -> floor(s/2), stride 1 -> s - 1)."""
        side = image_size
        for n in range(layers + 1):
            side = side // 2 if n < layers else side - 1
        return side - 1


def check_discriminator(cfg: LossConfig, image_size: int) -> None:
    if cfg.adversarial_weight > 0 and PatchDiscriminator.output_side(image_size, cfg.disc_layers) < 1:
        fits = max((n for n in range(1, 8) if PatchDiscriminator.output_side(image_size, n) >= 1), default=None)
        hint = f"set loss.disc_layers={fits} or fewer" if fits else "the images are too small for a PatchGAN"
        raise VqgenError(
            f"loss.disc_layers={cfg.disc_layers} shrinks {image_size}x{image_size} images to nothing; {hint}"
        )


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's lambda: the ratio of the gradient norms of the two losses at the decoder's last layer (detached)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQGANLoss:
    """The generator's extra terms and the discriminator's loss, for the training loop (not a module: the
    discriminator is prepared by Accelerate as its own model, the VGG is frozen and stays outside)."""

    def __init__(self, cfg: LossConfig, device: torch.device):
        self.cfg = cfg
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            self.perceptual = PerceptualLoss(cfg.perceptual_weights, cfg.lpips_weights).to(device)

    def adversarial_on(self, step: int) -> bool:
        return self.cfg.adversarial_weight > 0 and step >= self.cfg.disc_start

    def generator_loss(self, outputs, images: torch.Tensor, step: int, last_layer, discriminator) -> tuple:
        """(total loss, logs). `discriminator` is the unwrapped module: its parameters are frozen for this pass and
        it runs outside DDP, so the generator's backward neither touches nor all-reduces them."""
        cfg, logs = self.cfg, {}
        rec = outputs.recon_loss
        if self.perceptual is not None:
            p_loss = self.perceptual(images, outputs.reconstruction).mean()
            rec = rec + cfg.perceptual_weight * p_loss
            logs["train/perceptual_loss"] = p_loss.detach()
        total = rec + (outputs.loss - outputs.recon_loss)  # the quantizer's terms, unchanged
        if self.adversarial_on(step):
            discriminator.requires_grad_(False)
            g_loss = -discriminator(outputs.reconstruction).float().mean()
            discriminator.requires_grad_(True)
            weight = adaptive_weight(rec, g_loss, last_layer) if cfg.adaptive_weight else torch.ones(())
            total = total + cfg.adversarial_weight * weight * g_loss
            logs["train/g_loss"], logs["train/adaptive_weight"] = g_loss.detach(), weight
        return total, logs

    @staticmethod
    def discriminator_loss(discriminator, images: torch.Tensor, reconstruction: torch.Tensor) -> tuple:
        """The hinge loss of real and reconstructed images, scored in separate forwards (as taming-transformers and
        pix2pix do): BatchNorm then normalises the fakes by a batch of fakes alone, as in the generator's step that
        the discriminator is judged by. One concatenated batch would normalise them together with the reals, and
        the discriminator would learn logits for a mix it never sees when the generator asks it (a margin of ~9
        logits in the mixed batch shrank to 0.8 on fakes alone). Both forwards feed one backward, which DDP allows
        (autograd sums a parameter's two paths before its gradient hook runs)."""
        real = discriminator(images).float()
        fake = discriminator(reconstruction.detach()).float()
        loss = hinge_d_loss(real, fake)
        logs = {"train/d_loss": loss.detach(), "train/logits_real": real.mean().detach()}
        logs["train/logits_fake"] = fake.mean().detach()
        return loss, logs

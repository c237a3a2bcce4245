"""Losses beyond the paper's MSE, as options for natural images (VQGAN, Esser et al. 2021): a perceptual loss
and a PatchGAN discriminator with the hinge loss and VQGAN's adaptive weight. The paper's loss stays the default
(every weight 0) and is then computed exactly as before.

    generator:      L = MSE + quantizer terms + p * perceptual + lambda * a * (-mean D(x_hat))      (after disc_start)
    lambda        = ||grad_W (MSE + p * perceptual)|| / (||grad_W (-mean D(x_hat))|| + 1e-4), clamped to [0, 1e4],
                    W the decoder's last layer (VQGAN's adaptive weight; `adaptive_weight: false` uses 1)
    discriminator:  L_D = (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2              (hinge, after disc_start)

The perceptual loss is LPIPS's (Zhang et al. 2018) distance on VGG16 features (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3): channel-normalised feature differences, squared, weighted per channel by LPIPS's linear
layers when given (`loss.lpips_weights`) or summed, averaged over space, summed over layers. Nothing is ever
downloaded: the VGG16 weights come from a file the user points to or the torch hub cache; a missing file is one
error that says where to get it. The network's widths are read from the file, so tests use a tiny one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.cli import VqgenError
from vqgen.config import option

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, as torch.hub caches them
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
# torchvision's vgg16().features: the conv layers' indices, the max-pools', and the ReLUs LPIPS taps.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOLS = (4, 9, 16, 23)  # (index 30, the last pool, follows the last tap and is not built)
VGG16_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling for images in [-1, 1] (its ScalingLayer).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


@dataclass
class LossConfig:
    perceptual_weight: float = option(0.0, "p; 0: off (the paper). LlamaGen and VQGAN use 1.0")
    perceptual_weights: str | None = option(None, "VGG16 weights (.pth or .safetensors); null: the torch hub cache")
    lpips_weights: str | None = option(None, "optional LPIPS linear layers (the lpips package's weights/v0.1/vgg.pth)")
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


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as e:  # a truncated or foreign file raises many types
        raise VqgenError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e)[:150]})") from None


def find_vgg16_weights(path: str | None) -> Path:
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise VqgenError(
                f"loss.perceptual_weights={path} does not exist. Get torchvision's VGG16 weights ({VGG16_URL}) on "
                "a machine with internet and point loss.perceptual_weights to the file"
            )
        return found
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not cached.is_file():
        raise VqgenError(
            f"loss.perceptual_weight > 0 needs VGG16 weights, and there are none in the torch hub cache ({cached}); "
            f"vqgen downloads nothing. Fetch {VGG16_URL} into that folder, or set loss.perceptual_weights=FILE"
        )
    return cached


class PerceptualLoss(nn.Module):
    """LPIPS's VGG16 distance between two image batches in [-1, 1]: (B,) per-image distances. Frozen."""

    def __init__(self, vgg_weights: str | None = None, lpips_weights: str | None = None):
        super().__init__()
        path = find_vgg16_weights(vgg_weights)
        state = _load_state(path, "VGG16 weights file")
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        layers: list[nn.Module] = []
        for i in range(VGG16_TAPS[-1] + 1):
            if i in VGG16_CONVS:
                key = f"{i}.weight"
                if key not in state or state[key].ndim != 4:
                    raise VqgenError(
                        f"{path} is not torchvision VGG16 weights (no conv tensor features.{key}); use {VGG16_URL}"
                    )
                out_ch, in_ch = state[key].shape[:2]
                layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
            elif i in VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        own = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= VGG16_TAPS[-1]}
        self.features.load_state_dict(own)
        widths = [self.features[i - 1].out_channels for i in VGG16_TAPS]
        self.lin = None
        if lpips_weights is not None:
            lin = _load_state(Path(lpips_weights), "LPIPS weights file")
            try:
                self.lin = nn.ParameterList(
                    [nn.Parameter(lin[f"lin{j}.model.1.weight"].reshape(1, w, 1, 1)) for j, w in enumerate(widths)]
                )  # (1, C, 1, 1) per tap
            except (KeyError, RuntimeError) as e:
                raise VqgenError(
                    f"{lpips_weights} does not hold LPIPS VGG linear layers matching {path} ({e})"
                ) from None
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W): gray images as RGB
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for j, (fa, fb) in enumerate(zip(self._taps(a.float()), self._taps(b.float()))):
            # Unit-normalise over channels (LPIPS's normalize_tensor), then squared difference.
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (na - nb).pow(2)  # (B, C, h, w)
            weighted = (diff * self.lin[j]).sum(1) if self.lin is not None else diff.sum(1)  # (B, h, w)
            total = total + weighted.mean(dim=(1, 2))
        return total  # (B,)


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

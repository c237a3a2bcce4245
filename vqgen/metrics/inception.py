"""Inception-V3 features exactly as torch-fidelity (and the TF-1.x FID code it reproduces) computes them.

FID, KID, precision/recall use the 2048-d pool3 features; the Inception Score uses the 1008 logits without
their bias ("logits_unbiased"). What makes the numbers comparable with published ones is not the network alone
but every step before it, which this module follows:

    uint8 (B, 3, H, W) -> float32 -> bilinear resize to 299x299 as TF 1.x does it (align_corners=False and no half-
    pixel offset: source = dest * in/out) -> (x - 128) / 128 -> the TF graph's Inception-V3

The TF graph differs from torchvision's Inception3 in three places, kept here: its average pools in the
35x35, 17x17 and first 8x8 blocks ignore the zero padding (`count_include_pad=False`), the last block pools by
max, and the classifier has 1008 outputs. Grayscale images are repeated to 3 channels (as torch-fidelity's
PIL `convert("RGB")` does). The weights are torch-fidelity's file (`vqgen.metrics.weights.INCEPTION`), whose
tensor names match torchvision's module names; nothing is downloaded. Features are computed in float32 with
autocast off: bf16 features move FID by whole points.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from vqgen.cli import VqgenError
from vqgen.metrics.weights import INCEPTION, file_digest, load_state, require_weights

SIZE = 299


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _BlockA(tv.InceptionA):  # 35x35
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))]


class _BlockC(tv.InceptionC):  # 17x17
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))]


class _BlockE(tv.InceptionE):  # 8x8; the TF graph's last block pools by max
    def __init__(self, in_channels: int, pool=_avg_pool_tf):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]


def build_inception() -> tv.Inception3:
    """The TF graph's architecture on torchvision's skeleton (uninitialised; load a state dict into it)."""
    blocks = [tv.BasicConv2d, _BlockA, tv.InceptionB, _BlockC, tv.InceptionD, _BlockE, tv.InceptionAux]
    net = tv.Inception3(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
    net.Mixed_7c = _BlockE(2048, pool=_max_pool_same)
    return net


def _tf1_source(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF 1.x's bilinear sampling along one axis (align_corners=False, no half-pixel centres): output i reads
    source position i * n_in / n_out, between its floor and the next index (clamped). -> (lo, hi, fraction)."""
    src = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.long()
    return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()


def tf1_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size), TF 1.x's bilinear resize: interpolate along W, then along H, as
    a + (b - a) * t (the same arithmetic as torch-fidelity, so the features agree to the last bits on a CPU)."""
    ylo, yhi, dy = _tf1_source(x.shape[-2], size, x.device)
    xlo, xhi, dx = _tf1_source(x.shape[-1], size, x.device)
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (B, C, size, W) each
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx  # (B, C, size, size)
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy.view(-1, 1)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 1 or 3, H, W) -> {"pool": (B, 2048), "logits_unbiased": (B, 1008)}, float32."""

    def __init__(self, weights: str | Path | None = None, flag: str = "--inception_weights"):
        super().__init__()
        path = require_weights(INCEPTION, None if weights is None else str(weights), flag)
        self.weights_path = path
        self.digest = file_digest(path)  # the extractor's identity in cache keys and reports
        self.net = build_inception()
        state = load_state(path, "Inception weights file")
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise VqgenError(
                f"{path} is not torch-fidelity's Inception-V3 ({str(e).splitlines()[0][:200]}); use {INCEPTION.url}"
            ) from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always in eval mode (batch norm uses its running statistics)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise VqgenError(f"Inception features take uint8 (B, 1 or 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        n = self.net
        with torch.autocast(images.device.type, enabled=False):
            x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # gray -> RGB, no copy
            x = tf1_resize(x.float())  # (B, 3, 299, 299)
            x = (x - 128) / 128
            for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1):
                x = layer(x)
            for layer in (n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a):
                x = layer(x)
            for layer in (n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
                x = layer(x)
            pool = x.mean(dim=(2, 3))  # (B, 2048, 8, 8) -> (B, 2048)
            logits = pool @ n.fc.weight.T  # (B, 1008): the Inception Score's logits leave out the bias
        return {"pool": pool, "logits_unbiased": logits}

"""LPIPS (Zhang et al. 2018) as the `lpips` package (v0.1) computes it, with weights from files, never downloaded.

    d(x, y) = sum_l mean_hw( sum_c w_lc (f_l(x) / ||f_l(x)||_c - f_l(y) / ||f_l(y)||_c)^2 )

with f_l the backbone's ReLU outputs at five taps (VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet:
relu1..relu5), ||.||_c the norm over channels (+1e-10), w_l LPIPS's learned linear layers, and inputs in [-1, 1]
shifted and scaled by LPIPS's ScalingLayer. Without linear layers (allowed for the training loss only) every
channel weighs 1. Backbone widths (and AlexNet's kernel sizes) are read from the weights file, so tests can use a
tiny network of the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vqgen.cli import VqgenError
from vqgen.metrics.weights import ALEXNET, LPIPS_LIN, VGG16, WeightFile, load_state, require_weights

# LPIPS's input scaling for images in [-1, 1] (its ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


@dataclass(frozen=True)
class Backbone:
    """torchvision's `features` Sequential up to the last tap: conv index -> (stride, padding), pool index ->
    (kernel, stride), a ReLU at every other index; the ReLUs whose outputs LPIPS compares."""

    file: WeightFile
    convs: dict
    pools: dict
    taps: tuple


VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOLS = (4, 9, 16, 23)  # (index 30, the last pool, follows the last tap and is not built)
VGG16_TAPS = (3, 8, 15, 22, 29)
DISPLAY = {"vgg": "VGG16", "alex": "AlexNet"}
BACKBONES = {
    "vgg": Backbone(VGG16, {i: (1, 1) for i in VGG16_CONVS}, {i: (2, 2) for i in VGG16_POOLS}, VGG16_TAPS),
    "alex": Backbone(
        ALEXNET, {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}, {2: (3, 2), 5: (3, 2)}, (1, 4, 7, 9, 11)
    ),
}


def build_backbone(net: str, state: dict, path: Path) -> nn.Sequential:
    spec = BACKBONES[net]
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    layers: list[nn.Module] = []
    for i in range(spec.taps[-1] + 1):
        if i in spec.convs:
            w = state.get(f"{i}.weight")
            if w is None or w.ndim != 4:
                raise VqgenError(
                    f"{path} is not torchvision {DISPLAY[net]} weights (no conv tensor features.{i}.weight); "
                    f"use {spec.file.url}"
                )
            stride, padding = spec.convs[i]
            layers.append(nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], stride=stride, padding=padding))
        elif i in spec.pools:
            layers.append(nn.MaxPool2d(*spec.pools[i]))
        else:
            layers.append(nn.ReLU())
    features = nn.Sequential(*layers)
    own = {k: v for k, v in state.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) <= spec.taps[-1]}
    try:
        features.load_state_dict(own)
    except RuntimeError as e:
        raise VqgenError(f"{path} does not fit torchvision's {net} layout ({str(e).splitlines()[0][:200]})") from None
    return features


class LPIPS(nn.Module):
    """Per-image LPIPS distances (B,) between two batches (B, 1 or 3, H, W) in [-1, 1]. Frozen, always eval.

    `backbone` / `lin`: weight files (None: the torch hub cache); `lin_required` makes missing linear layers an
    error (the metric) rather than unit weights (the training loss's option); `flags` name the options in errors.
    """

    def __init__(
        self,
        net: str = "vgg",
        backbone: str | None = None,
        lin: str | None = None,
        lin_required: bool = True,
        flags: tuple[str, str] = ("--lpips_backbone", "--lpips_weights"),
    ):
        super().__init__()
        if net not in BACKBONES:
            raise VqgenError(f"LPIPS net must be one of {sorted(BACKBONES)}, got {net!r}")
        spec = BACKBONES[net]
        self.net, self.taps = net, spec.taps
        path = require_weights(spec.file, backbone, flags[0])
        self.features = build_backbone(net, load_state(path, f"{net} weights file"), path)
        widths = [self.features[i - 1].out_channels for i in spec.taps]
        self.weights_paths = [path]
        self.lin = None
        lin_path = require_weights(LPIPS_LIN[net], lin, flags[1]) if lin_required or lin else None
        if lin_path is not None:
            state = load_state(lin_path, "LPIPS weights file")
            try:
                self.lin = nn.ParameterList(
                    [nn.Parameter(state[f"lin{j}.model.1.weight"].reshape(1, w, 1, 1)) for j, w in enumerate(widths)]
                )  # (1, C, 1, 1) per tap
            except (KeyError, RuntimeError) as e:
                raise VqgenError(f"{lin_path} does not hold LPIPS {net} linear layers matching {path} ({e})") from None
            self.weights_paths.append(lin_path)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    def check_size(self, height: int, width: int) -> None:
        """One clear error when images are too small for the backbone's pools (AlexNet needs about 32 px)."""
        try:
            with torch.no_grad():
                self._taps(torch.zeros(1, 3, height, width, device=self.shift.device))
        except RuntimeError:
            raise VqgenError(
                f"LPIPS-{self.net} cannot score {height}x{width} images: its pooling needs larger ones; use the VGG "
                "backbone (lpips_net vgg, from 16 px)"
            ) from None

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W): gray images as RGB
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
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

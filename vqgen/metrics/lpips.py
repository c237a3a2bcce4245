"""LPIPS (Zhang et al. 2018): the `lpips` package's own network and distance (v0.1), with every weight from a
local file: nothing is downloaded.

The package builds its backbone through torchvision's pretrained-weights download, so vqgen builds it on the
meta device (no download and no initialisation of the classifier it discards, 2 s for VGG16) and then loads, in
one strict `load_state_dict`: the backbone from a torchvision ImageNet file (found offline by
`vqgen.metrics.standard`), the linear layers from the file the package ships (`lpips/weights/v0.1/NET.pth`) or
one given, and the package's input scaling. Without linear layers (the training loss's option) every channel weighs 1.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lpips
import torch
from torchvision.models import AlexNet_Weights, VGG16_Weights

from vqgen.cli import VqgenError
from vqgen.hub import read_state_dict

URLS = {"vgg": VGG16_Weights.IMAGENET1K_V1.url, "alex": AlexNet_Weights.IMAGENET1K_V1.url}  # the backbones' files


class LPIPS(lpips.LPIPS):
    """Per-image LPIPS distances (B,) between two batches (B, 1 or 3, H, W) in [-1, 1]. Frozen, always eval.

    `backbone`: torchvision's ImageNet weights file (`vqgen.metrics.standard` finds it); `lin`: the linear layers
    (None: the package's own); `linear=False` sums channels with unit weights (the training loss's option)."""

    def __init__(self, net: str, backbone: str | Path, lin: str | None = None, linear: bool = True):
        if net not in URLS:
            raise VqgenError(f"LPIPS net must be one of {sorted(URLS)}, got {net!r}")
        path = Path(backbone)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notice about the `pretrained` argument lpips passes
            super().__init__(net=net, lpips=linear, pretrained=False, pnet_rand=True, verbose=False)
        given = read_state_dict(path, f"{net} weights file")
        state = lpips.ScalingLayer().state_dict(prefix="scaling_layer.")
        for key in self.net.state_dict():  # slice{k}.{index}.weight: torchvision's features.{index}.weight
            if (name := "features." + key.split(".", 1)[1]) in given:
                state["net." + key] = given[name]
        self.weights_paths = [path]
        if linear:
            lin_path = Path(lin) if lin is not None else Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
            lins = read_state_dict(lin_path, "LPIPS weights file")
            for key, value in lins.items():  # lin{j}.*, also held as lins.{j}.*
                state[key] = state[re.sub(r"^lin(\d+)\.", r"lins.\1.", key)] = value
            self.weights_paths.append(lin_path)
        self.to_empty(device="cpu")
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise VqgenError(
                f"{path} is not torchvision's {URLS[net].rsplit('/', 1)[1]} layout, or the linear layers do not fit "
                f"it ({str(e).splitlines()[-1].strip()[:200]}); use {URLS[net]}"
            ) from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    def check_size(self, height: int, width: int) -> None:
        """One clear error when images are too small for the backbone's pools (AlexNet needs about 32 px)."""
        try:
            with torch.no_grad():
                self.net(torch.zeros(1, 3, height, width, device=self.scaling_layer.shift.device))
        except RuntimeError:
            raise VqgenError(
                f"LPIPS-{self.pnet_type} cannot score {height}x{width} images: its pooling needs larger ones; use the "
                "VGG backbone (lpips_net vgg, from 16 px)"
            ) from None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in (a.float(), b.float()))  # gray as RGB
        return super().forward(a, b).flatten()  # (B, 1, 1, 1) -> (B,)

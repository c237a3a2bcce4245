"""Which standard metrics a run computes, and the weight files their networks need, found offline: the `metrics`
config section of stage 1 and the flags of the evaluation commands.

`standard: auto` computes rFID/FID (Inception) and LPIPS whenever their weight files are found and says once which
file would add the missing ones; `on` makes a missing file an error; `off` skips them. A file is taken from an
explicit path (a flag or config key) or from the torch hub cache (`torch.hub.get_dir()/checkpoints/`, where
torch-fidelity, torchvision and lpips users already have them); nothing is ever downloaded, and a missing file is
one error that names it, its size and checksum, where to get it and where to put it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchvision.models import AlexNet_Weights, VGG16_Weights

from vqgen.cli import VqgenError
from vqgen.config import option

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    url: str  # where its publisher serves it; the file name in the torch hub cache is the URL's last part
    what: str
    size: str  # as the publisher states it

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def sha256(self) -> str:  # the prefix torch hub names its files by
        return self.name.rsplit("-", 1)[1].split(".")[0]


# The URLs as torch-fidelity and torchvision state them (their download paths, never called here)
INCEPTION = WeightFile(URL_INCEPTION_V3, "torch-fidelity's Inception-V3 of TF 2015-12-05, for FID, KID, IS and "
                       "precision/recall", "about 95.6 MB")  # fmt: skip
VGG16 = WeightFile(VGG16_Weights.IMAGENET1K_V1.url, "torchvision's ImageNet VGG16, the LPIPS-VGG backbone", "527.8 MB")
ALEXNET = WeightFile(AlexNet_Weights.IMAGENET1K_V1.url, "torchvision's ImageNet AlexNet, the LPIPS-Alex backbone",
                     "233.1 MB")  # fmt: skip
LPIPS_BACKBONES = {"vgg": VGG16, "alex": ALEXNET}


def cache_path(spec: WeightFile) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.name


def missing_message(spec: WeightFile, flag: str) -> str:
    return (
        f"{spec.name} ({spec.what}) is needed and is not in the torch hub cache ({cache_path(spec).parent}); vqgen "
        f"downloads nothing. Fetch {spec.url} ({spec.size}; sha256 begins {spec.sha256}) on a machine with internet "
        f"and put it in that folder, or pass {flag}=FILE"
    )


def find_weights(spec: WeightFile, path: str | None, flag: str, required: bool = False) -> Path | None:
    """The file to use: `path` when given (an error if it does not exist), else the hub cache's copy, else None
    (or the error, when `required`)."""
    if path is not None and not Path(path).expanduser().is_file():
        raise VqgenError(f"{flag}={path} does not exist. " + missing_message(spec, flag))
    found = Path(path).expanduser() if path is not None else cache_path(spec)
    if required and not found.is_file():
        raise VqgenError(missing_message(spec, flag))
    return found if found.is_file() else None


@dataclass
class MetricsConfig:
    standard: Literal["auto", "on", "off"] = option(
        "auto", "rFID/FID and LPIPS: auto (when their weight files are found), on (a missing file is an error), off"
    )
    inception_weights: str | None = option(None, "torch-fidelity's Inception-V3 file; null: the torch hub cache")
    lpips_net: Literal["alex", "vgg"] = option(
        "vgg", "LPIPS backbone: vgg (from 16 px; vqgen's perceptual loss) or alex (the lpips package's, from 32 px)"
    )
    lpips_backbone: str | None = option(None, "torchvision AlexNet/VGG16 weights; null: the torch hub cache")
    lpips_weights: str | None = option(None, "LPIPS v0.1 linear layers; null: the ones the lpips package ships")


FLAGS = {k: f"--{k}" for k in ("inception_weights", "lpips_backbone", "lpips_weights")}


def add_arguments(parser, lpips: bool = True) -> None:
    """The evaluation commands' flags for the same settings."""
    parser.add_argument("--standard_metrics", default="auto", choices=["auto", "on", "off"],
                        help="Inception/LPIPS metrics: auto (when the weight files are found), on, off")  # fmt: skip
    parser.add_argument("--inception_weights", default=None, help="torch-fidelity's Inception-V3 weights file")
    if lpips:
        parser.add_argument("--lpips_net", default="vgg", choices=sorted(LPIPS_BACKBONES),
                            help="LPIPS backbone: vgg (from 16 px) or alex (lpips's default, from 32 px)")  # fmt: skip
        parser.add_argument("--lpips_backbone", default=None, help="torchvision AlexNet/VGG16 weights file")
        parser.add_argument("--lpips_weights", default=None, help="LPIPS v0.1 linear layers (default: lpips's own)")


def from_arguments(args) -> MetricsConfig:
    names = ("inception_weights", "lpips_net", "lpips_backbone", "lpips_weights")  # (absent without lpips flags)
    return MetricsConfig(args.standard_metrics, **{k: getattr(args, k) for k in names if hasattr(args, k)})


def _weights(cfg: MetricsConfig, spec: WeightFile, path: str | None, flag: str, what: str, level: int) -> Path | None:
    """The file a metric needs, or None: standard off, or auto without the file (said at `level`); under on a
    missing file is an error."""
    if cfg.standard == "off":
        return None
    found = find_weights(spec, path, flag, required=cfg.standard == "on")
    if found is None:
        logger.log(level, "%s not computed: %s", what, missing_message(spec, flag))
    return found


def load_inception(cfg: MetricsConfig, flags: dict = FLAGS, level: int = logging.WARNING):
    """The Inception feature extractor, or None (standard off, or auto without the file)."""
    path = _weights(cfg, INCEPTION, cfg.inception_weights, flags["inception_weights"], "FID/KID/IS", level)
    if path is None:
        return None
    from vqgen.metrics.inception import InceptionFeatures

    return InceptionFeatures(path)


def load_lpips(cfg: MetricsConfig, flags: dict = FLAGS, level: int = logging.WARNING):
    """The LPIPS metric network (with its linear layers), or None."""
    spec = LPIPS_BACKBONES[cfg.lpips_net]
    backbone = _weights(cfg, spec, cfg.lpips_backbone, flags["lpips_backbone"], "LPIPS", level)
    if backbone is None:
        return None
    from vqgen.metrics.lpips import LPIPS

    return LPIPS(cfg.lpips_net, backbone, cfg.lpips_weights)

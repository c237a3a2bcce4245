"""Which standard metrics a run computes, and their networks: the `metrics` config section of stage 1 and the
flags of the evaluation commands.

`standard: auto` computes rFID/FID (Inception) and LPIPS whenever their weight files are found (a path given here
or the torch hub cache) and says once which file would add the missing ones; `on` makes a missing file an error;
`off` skips them. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from vqgen.cli import VqgenError
from vqgen.config import option
from vqgen.metrics.lpips import BACKBONES
from vqgen.metrics.weights import INCEPTION, LPIPS_LIN, find_weights, missing_message

logger = logging.getLogger(__name__)


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
    lpips_weights: str | None = option(None, "LPIPS v0.1 linear layers (lpips/weights/v0.1/NET.pth); null: hub cache")


FLAGS = {
    "inception_weights": "--inception_weights",
    "lpips_backbone": "--lpips_backbone",
    "lpips_weights": "--lpips_weights",
}


def add_arguments(parser, lpips: bool = True) -> None:
    """The evaluation commands' flags for the same settings."""
    parser.add_argument("--standard_metrics", default="auto", choices=["auto", "on", "off"],
                        help="Inception/LPIPS metrics: auto (when the weight files are found), on, off")  # fmt: skip
    parser.add_argument("--inception_weights", default=None, help="torch-fidelity's Inception-V3 weights file")
    if lpips:
        parser.add_argument("--lpips_net", default="vgg", choices=sorted(BACKBONES),
                            help="LPIPS backbone: vgg (from 16 px) or alex (lpips's default, from 32 px)")  # fmt: skip
        parser.add_argument("--lpips_backbone", default=None, help="torchvision AlexNet/VGG16 weights file")
        parser.add_argument("--lpips_weights", default=None, help="LPIPS v0.1 linear layers file")


def from_arguments(args) -> MetricsConfig:
    return MetricsConfig(
        standard=args.standard_metrics,
        inception_weights=args.inception_weights,
        lpips_net=getattr(args, "lpips_net", "vgg"),
        lpips_backbone=getattr(args, "lpips_backbone", None),
        lpips_weights=getattr(args, "lpips_weights", None),
    )


def _available(cfg: MetricsConfig, specs: list, what: str, flags: dict, level: int) -> bool:
    """Whether every file of `specs` [(WeightFile, path, key)] is there; under `auto` a missing one is logged."""
    for spec, path, key in specs:
        if find_weights(spec, path, flags[key]) is None:
            if cfg.standard == "on":
                raise VqgenError(missing_message(spec, flags[key]))
            logger.log(level, "%s not computed: %s", what, missing_message(spec, flags[key]))
            return False
    return True


def load_inception(cfg: MetricsConfig, flags: dict = FLAGS, level: int = logging.WARNING):
    """The Inception feature extractor, or None (standard off, or auto without the file, said at `level`)."""
    if cfg.standard == "off":
        return None
    if not _available(cfg, [(INCEPTION, cfg.inception_weights, "inception_weights")], "FID/KID/IS", flags, level):
        return None
    from vqgen.metrics.inception import InceptionFeatures

    return InceptionFeatures(cfg.inception_weights, flag=flags["inception_weights"])


def load_lpips(cfg: MetricsConfig, flags: dict = FLAGS, level: int = logging.WARNING):
    """The LPIPS metric network (with its linear layers), or None."""
    if cfg.standard == "off":
        return None
    specs = [
        (BACKBONES[cfg.lpips_net].file, cfg.lpips_backbone, "lpips_backbone"),
        (LPIPS_LIN[cfg.lpips_net], cfg.lpips_weights, "lpips_weights"),
    ]
    if not _available(cfg, specs, "LPIPS", flags, level):
        return None
    from vqgen.metrics.lpips import LPIPS

    names = (flags["lpips_backbone"], flags["lpips_weights"])
    return LPIPS(cfg.lpips_net, cfg.lpips_backbone, cfg.lpips_weights, flags=names)

"""The pretrained weight files the standard metrics need, found offline: never downloaded.

A file is taken from an explicit path (a flag or config key) or from the torch hub cache
(`torch.hub.get_dir()/checkpoints/`, where torch-fidelity, torchvision and lpips users already have them). A missing
file is one error that names the file, its size and checksum, where to get it and where to put it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vqgen.cli import VqgenError


@dataclass(frozen=True)
class WeightFile:
    name: str  # the file name in the torch hub cache
    what: str
    url: str
    size: str  # as the publisher states it
    sha256: str  # the full digest, or the prefix torch hub names files by (checked with `torch.hub.check_hash`)


INCEPTION = WeightFile(
    "weights-inception-2015-12-05-6726825d.pth",
    "torch-fidelity's Inception-V3 of TF 2015-12-05, for FID, KID, IS and precision/recall",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "about 95.6 MB",
    "6726825d",
)
VGG16 = WeightFile(
    "vgg16-397923af.pth",
    "torchvision's ImageNet VGG16, the LPIPS-VGG backbone",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "527.8 MB",
    "397923af",
)
ALEXNET = WeightFile(
    "alexnet-owt-7be5be79.pth",
    "torchvision's ImageNet AlexNet, the LPIPS-Alex backbone",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "233.1 MB",
    "7be5be79",
)
# LPIPS v0.1's linear layers, as the lpips package ships them (lpips/weights/v0.1/{net}.pth); cached under these names.
LPIPS_LIN = {
    "vgg": WeightFile(
        "lpips-v0.1-vgg.pth",
        "LPIPS v0.1's linear layers for VGG, the lpips package's weights/v0.1/vgg.pth",
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        "7,289 bytes",
        "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    ),
    "alex": WeightFile(
        "lpips-v0.1-alex.pth",
        "LPIPS v0.1's linear layers for AlexNet, the lpips package's weights/v0.1/alex.pth",
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
        "6,009 bytes",
        "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    ),
}


def cache_path(spec: WeightFile) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.name


def missing_message(spec: WeightFile, flag: str) -> str:
    digest = spec.sha256 if len(spec.sha256) == 64 else f"begins {spec.sha256}"
    return (
        f"{spec.name} ({spec.what}) is needed and is not in the torch hub cache ({cache_path(spec).parent}); vqgen "
        f"downloads nothing. Fetch {spec.url} ({spec.size}; sha256 {digest}) on a machine with internet and put it "
        f"in that folder, or pass {flag}=FILE"
    )


def find_weights(spec: WeightFile, path: str | None, flag: str) -> Path | None:
    """The file to use: `path` when given (an error if it does not exist), else the hub cache's copy, else None."""
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise VqgenError(f"{flag}={path} does not exist. " + missing_message(spec, flag))
        return found
    cached = cache_path(spec)
    return cached if cached.is_file() else None


def require_weights(spec: WeightFile, path: str | None, flag: str) -> Path:
    found = find_weights(spec, path, flag)
    if found is None:
        raise VqgenError(missing_message(spec, flag))
    return found


def load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from .pth (tensors only: no code runs) or .safetensors; one error for a foreign file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many types
        raise VqgenError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e)[:150]})") from None


def file_digest(path: Path) -> str:
    """sha256 of a weights file (the feature extractor's identity in cache keys), memoised by path, size, mtime."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}

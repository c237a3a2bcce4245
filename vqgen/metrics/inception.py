"""Inception-V3 features for FID, KID, IS and precision/recall: torch-fidelity's own extractor (the TF-1.x graph,
its bilinear resize to 299x299 and its scaling), from the local weights file `vqgen.metrics.standard` finds.

vqgen adds around it only what torch-fidelity leaves to its caller: gray images repeated to RGB (as its PIL
`convert("RGB")` does to files), autocast off (bf16 features move FID by whole points), a digest of the weights
file for cache keys and reports, and one-line errors. torch-fidelity reads the file with `torch.load(...,
weights_only=False)`, which would run code a file carries; vqgen reads it with `weights_only=True` first, so such
a file is refused before torch-fidelity opens it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from vqgen.cli import VqgenError
from vqgen.files import file_sha256
from vqgen.hub import read_state_dict

KEYS = ("2048", "logits_unbiased")  # torch-fidelity's names: the pool features and the bias-free logits (IS)


class InceptionFeatures(FeatureExtractorInceptionV3):
    """uint8 images (B, 1 or 3, H, W) -> {"pool": (B, 2048), "logits_unbiased": (B, 1008)}, float32. Frozen."""

    def __init__(self, path: str | Path):
        """`path`: the weights file (`vqgen.metrics.standard.load_inception` finds it from flags or the cache)."""
        path = Path(path)
        read_state_dict(path, "Inception weights file")  # tensors only, or one error (see the module's docstring)
        try:
            super().__init__("inception-v3-compat", list(KEYS), feature_extractor_weights_path=str(path))
        except RuntimeError as e:
            raise VqgenError(
                f"{path} is not torch-fidelity's Inception-V3 ({str(e).splitlines()[0][:200]}); use {URL_INCEPTION_V3}"
            ) from None
        self.weights_path, self.digest = path, file_sha256(path)  # the digest: the extractor's identity in caches

    def train(self, mode: bool = True):  # always in eval mode (batch norm uses its running statistics)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise VqgenError(f"Inception features take uint8 (B, 1 or 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # gray -> RGB, no copy
        with torch.autocast(images.device.type, enabled=False):
            pool, logits = super().forward(x)
        return {"pool": pool, "logits_unbiased": logits}

"""Sample quality on MNIST-like data: a small classifier owned by the project, its accuracy on class-conditional
samples, and a Frechet distance in its feature space (an "FID" that needs no downloaded Inception weights;
not comparable to Inception FID numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallClassifier(nn.Module):
    """Two conv blocks and a 128-d feature layer; inputs (B, C, 28, 28)-ish in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        return F.relu(self.fc(x.flatten(1)))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> SmallClassifier:
    """Fit on (N, C, H, W) images in [-1, 1]; seeded, a few seconds to a minute on a CPU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images: torch.Tensor, batch_size: int = 1000):
    """(logits argmax, 128-d features) for (N, C, H, W) images in [-1, 1]."""
    preds, feats = [], []
    for lo in range(0, len(images), batch_size):
        f = model.features(images[lo : lo + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between two (N, F) feature sets."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sqrt_ca = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * cross)

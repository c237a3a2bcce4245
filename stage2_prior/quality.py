"""Sample quality on MNIST-like data: a small classifier owned by the project, its accuracy on class-conditional
samples, and a Frechet distance in its feature space (torchmetrics' FID with this classifier in place of
Inception: it needs no downloaded weights, and its numbers are not comparable to Inception FID).
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
def predict(model: SmallClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N,) predicted classes for (N, C, H, W) images in [-1, 1]."""
    return torch.cat([model(images[lo : lo + batch_size]).argmax(1) for lo in range(0, len(images), batch_size)])


class ClassifierFeatures(nn.Module):
    """The classifier's 128-d penultimate layer as a torchmetrics feature extractor."""

    def __init__(self, classifier: SmallClassifier, example: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.num_features = self(example[:1]).shape[1]  # torchmetrics sizes its statistics by this

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self.classifier.fc.weight.dtype))


@torch.no_grad()
def frechet_distance(classifier: SmallClassifier, a: torch.Tensor, b: torch.Tensor, batch_size: int = 1000) -> float:
    """Frechet distance between two image sets ((N, C, H, W) in [-1, 1]) in the classifier's feature space
    (torchmetrics' FID with the project's classifier in place of Inception)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier, a), normalize=False)
    for images, real in ((a, False), (b, True)):
        for lo in range(0, len(images), batch_size):
            fid.update(images[lo : lo + batch_size], real=real)
    return float(fid.compute())

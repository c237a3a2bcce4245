"""Images out of the models: the one conversion from [-1, 1] to [0, 1], and grids for runs and model cards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """Model images (B, C, H, W) in [-1, 1] -> float CPU images in [0, 1]: the one conversion for output."""
    return images.detach().float().clamp(-1, 1).add(1).div(2).cpu()


def save_image_grid(rows: list[torch.Tensor], path: Path, min_side: int = 112) -> torch.Tensor:
    """Rows of [-1, 1] images (each (n, C, H, W)) -> one PNG written atomically; returns it as (H, W, 3) uint8.

    Small images are enlarged (nearest neighbour, a whole factor) to about `min_side` pixels, so that a grid of
    28x28 digits reads on a model card instead of being a thumbnail.
    """
    from torchvision.utils import make_grid, save_image

    images = unit_images(torch.cat(rows))  # (n_rows * n, C, H, W) in [0, 1]
    scale = max(1, min_side // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=len(rows[0]), padding=2 * scale)  # (3, H, W)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid, tmp, format="png")
    tmp.replace(path)
    return grid.mul(255).round().byte().permute(1, 2, 0)


def labelled_rows(grid: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """(3, H, W) grid of len(labels) equal rows -> the same with each row's label written in a left margin."""
    from PIL import ImageDraw

    rows, width = len(labels), 8 + 6 * max(len(t) for t in labels)
    canvas = Image.new("RGB", (grid.shape[2] + width, grid.shape[1]), "black")
    canvas.paste(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()), (width, 0))
    draw, row_height = ImageDraw.Draw(canvas), grid.shape[1] / rows
    for i, text in enumerate(labels):
        draw.text((4, int(i * row_height + row_height / 2 - 5)), text, fill="white")
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255  # (3, H, W + margin)

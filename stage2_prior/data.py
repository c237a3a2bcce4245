"""Code datasets for stage 2: the `stage1_vqvae.extract` output (local folder or Hub id) as token sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stage1_vqvae.codes import CodesMeta, load_code_dataset
from stage1_vqvae.shared import VqgenError
from stage2_prior.model import TokenLayout, grid_to_input_ids


@dataclass
class CodeDataConfig:
    codes: str = "runs/mnist/codes"  # extract output folder, or a Hub dataset id
    conditional: bool = True  # condition on the label column when the codes have one
    max_samples: int | None = None  # cap on every split (quick runs and tests)


class CodeSequences(torch.utils.data.Dataset):
    """All sequences of one split, tokenised once: (N, 2 + h*w) int64 input ids."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i]}


def load_code_splits(
    cfg: CodeDataConfig, splits: tuple[str, ...] = ("train", "validation", "test")
) -> tuple[dict[str, CodeSequences], CodesMeta, TokenLayout]:
    """({split: CodeSequences}, CodesMeta, TokenLayout) for `splits`; checks the codes against their metadata."""
    dd, meta = load_code_dataset(cfg.codes)
    layout = TokenLayout.from_meta(meta, cfg.conditional)
    k, (h, w) = meta.codebook_size, meta.grid
    out = {}
    for split in splits:
        if split not in dd:
            raise VqgenError(f"code dataset {cfg.codes} has no {split!r} split (it has {sorted(dd)})")
        ds = dd[split]
        if cfg.max_samples is not None:
            ds = ds.select(range(min(cfg.max_samples, len(ds))))
        if len(ds) == 0:
            raise VqgenError(f"code dataset {cfg.codes}: split {split!r} is empty")
        arr = ds.with_format("numpy")[:]
        codes = torch.from_numpy(np.asarray(arr["codes"]).astype(np.int64))  # (N, h, w)
        if tuple(codes.shape[1:]) != (h, w):
            raise VqgenError(
                f"code dataset {cfg.codes}: split {split!r} holds {tuple(codes.shape[1:])} grids but "
                f"its metadata says {(h, w)}; re-run stage1_vqvae.extract"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise VqgenError(
                f"code dataset {cfg.codes}: split {split!r} holds codes outside [0, {k}); "
                "it does not match its metadata's K"
            )
        classes = None
        if layout.num_classes:
            classes = torch.from_numpy(np.asarray(arr["label"]).astype(np.int64))
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= layout.num_classes):
                raise VqgenError(
                    f"code dataset {cfg.codes}: split {split!r} has labels outside the {layout.num_classes} class names"
                )
        out[split] = CodeSequences(grid_to_input_ids(codes, layout, classes))
    return out, meta, layout

"""Code datasets for stage 2: the `stage1_vqvae.extract` output (local folder or Hub id) as token sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stage2_prior.model import TokenLayout, grid_to_input_ids
from vqgen.cli import VqgenError
from vqgen.codes import CodesMeta, check_codes_fingerprint, load_code_dataset
from vqgen.config import option
from vqgen.streaming import StreamBatches


@dataclass
class CodeDataConfig:
    codes: str = option("runs/mnist/codes", "extract output folder, or a Hub dataset id")
    conditional: bool = option(True, "condition on the label column when the codes have one")
    max_samples: int | None = option(None, "cap on every split (quick runs and tests)")
    cache_max_gb: float = option(1.0, "token ids held in memory while they fit (GiB); larger splits stay memory-mapped")
    streaming: bool = option(False, "stream the codes' parquet files (a Hub id or a folder); nothing is downloaded")
    shuffle_buffer: int = option(10000, "streaming: sequences in the shuffle buffer")
    streaming_eval_rows: int = option(5000, "streaming: validation uses the first rows of its split, held in memory")

    def __post_init__(self):
        if self.cache_max_gb < 0 or self.shuffle_buffer < 1 or self.streaming_eval_rows < 1:
            raise ValueError("cache_max_gb must be >= 0, shuffle_buffer and streaming_eval_rows positive")


def _check_codes(codes: torch.Tensor, classes, cfg: CodeDataConfig, split: str, k: int, hw, num_classes: int) -> None:
    if tuple(codes.shape[1:]) != tuple(hw):
        raise VqgenError(
            f"code dataset {cfg.codes}: split {split!r} holds {tuple(codes.shape[1:])} grids but "
            f"its metadata says {tuple(hw)}; re-run stage1_vqvae.extract"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise VqgenError(
            f"code dataset {cfg.codes}: split {split!r} holds codes outside [0, {k}); "
            "it does not match its metadata's K"
        )
    if classes is not None and classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise VqgenError(f"code dataset {cfg.codes}: split {split!r} has labels outside the {num_classes} class names")


class CodeSequences(torch.utils.data.Dataset):
    """All sequences of one split, tokenised once: (N, 2 + h*w) int64 input ids."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i]}


class MappedCodeSequences(torch.utils.data.Dataset):
    """One split left in its memory-mapped Arrow table and tokenised batch by batch: memory does not grow with
    the number of rows (a split over `data.cache_max_gb`). Every batch is checked as it is read."""

    def __init__(self, ds, cfg: CodeDataConfig, split: str, meta: CodesMeta, layout: TokenLayout):
        self.ds = ds.with_format("numpy")
        self.cfg, self.split, self.meta, self.layout = cfg, split, meta, layout

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def input_ids(self) -> torch.Tensor:
        """Every row tokenised (the evaluation CLI's whole-split view): (N, 2 + h*w)."""
        return torch.cat([self._ids(range(lo, min(lo + 65536, len(self)))) for lo in range(0, len(self), 65536)])

    def _ids(self, indices) -> torch.Tensor:
        rows = self.ds[list(indices)]
        codes = torch.from_numpy(np.asarray(rows["codes"]).astype(np.int64))  # (B, h, w)
        classes = None
        if self.layout.num_classes:
            classes = torch.from_numpy(np.asarray(rows["label"]).astype(np.int64))
        k, hw = self.meta.codebook_size, self.meta.grid
        _check_codes(codes, classes, self.cfg, self.split, k, hw, self.layout.num_classes)
        return grid_to_input_ids(codes, self.layout, classes)  # (B, 2 + h*w)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [{"input_ids": row} for row in self._ids([int(i) for i in indices])]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


def load_code_splits(
    cfg: CodeDataConfig, splits: tuple[str, ...] = ("train", "validation", "test"), seed: int = 0
) -> tuple[dict[str, CodeSequences | MappedCodeSequences], CodesMeta, TokenLayout]:
    """({split: sequences}, CodesMeta, TokenLayout) for `splits`; checks the codes against their metadata.

    Splits whose int64 token ids fit `data.cache_max_gb` (all together, smallest first) are tokenised into memory;
    the others stay memory-mapped (`MappedCodeSequences`). With `data.streaming`, train is a `StreamingCodes`
    and the other splits their first `data.streaming_eval_rows` rows; `seed` (the run's `train.seed`) shuffles it.
    """
    if cfg.streaming:
        return streaming_code_splits(cfg, splits, seed)
    dd, meta = load_code_dataset(cfg.codes)
    layout = TokenLayout.from_meta(meta, cfg.conditional)
    k, (h, w) = meta.codebook_size, meta.grid
    out, used = {}, 0
    for split in splits:
        if split not in dd:
            raise VqgenError(f"code dataset {cfg.codes} has no {split!r} split (it has {sorted(dd)})")
    for split in sorted(splits, key=lambda s: len(dd[s])):
        ds = dd[split]
        if cfg.max_samples is not None:
            ds = ds.select(range(min(cfg.max_samples, len(ds))))
        if len(ds) == 0:
            raise VqgenError(f"code dataset {cfg.codes}: split {split!r} is empty")
        nbytes = len(ds) * (2 + h * w) * 8
        if used + nbytes > cfg.cache_max_gb * 2**30:
            out[split] = MappedCodeSequences(ds, cfg, split, meta, layout)
            continue
        used += nbytes
        arr = ds.with_format("numpy")[:]
        codes = torch.from_numpy(np.asarray(arr["codes"]).astype(np.int64))  # (N, h, w)
        classes = None
        if layout.num_classes:
            classes = torch.from_numpy(np.asarray(arr["label"]).astype(np.int64))
        _check_codes(codes, classes, cfg, split, k, (h, w), layout.num_classes)
        out[split] = CodeSequences(grid_to_input_ids(codes, layout, classes))
    return {s: out[s] for s in splits}, meta, layout


# --------------------------------------------------------------------------------------------------
# Streamed codes


def open_code_streams(cfg: CodeDataConfig) -> tuple[dict, CodesMeta]:
    """({split: datasets.IterableDataset}, CodesMeta) read on the fly: an extraction folder, or a Hub dataset's
    parquet files over `hf://` (HfFileSystem: only the rows read are fetched, nothing is downloaded first)."""
    import json
    from pathlib import Path

    import datasets
    import fsspec

    from vqgen.codes import CODES_METADATA
    from vqgen.hub import looks_like_repo_id

    path = Path(cfg.codes)
    if path.exists():
        meta = CodesMeta.load(path)
        if (path / "data" / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(path / "data"))
            check_codes_fingerprint(saved, meta, cfg.codes)
            return {k: v.to_iterable_dataset(num_shards=min(16, max(1, len(v)))) for k, v in saved.items()}, meta
        base = str(path / "data")
    elif looks_like_repo_id(cfg.codes):
        base = f"hf://datasets/{cfg.codes}/data"
        try:
            with fsspec.open(f"hf://datasets/{cfg.codes}/{CODES_METADATA}", "r") as f:
                meta = CodesMeta.from_json_dict(json.load(f), f"{cfg.codes}/{CODES_METADATA}")
        except VqgenError:
            raise
        except Exception as e:  # offline, no such repo, no metadata: many types
            raise VqgenError(
                f"code dataset {cfg.codes}: cannot read its {CODES_METADATA} from the Hub ({type(e).__name__}); "
                "check the id and your network, or pass a local folder"
            ) from None
    else:
        raise VqgenError(f"code dataset {cfg.codes}: no such folder, and it is not a Hub dataset id (owner/name)")
    files = {split: f"{base}/{split}-*.parquet" for split in meta.splits}
    try:
        streams = datasets.load_dataset("parquet", data_files=files, streaming=True)
    except Exception as e:
        raise VqgenError(
            f"code dataset {cfg.codes}: cannot stream its parquet files ({type(e).__name__}: {e})"
        ) from None
    if path.exists():  # read through once (local files); a Hub stream would be downloaded whole to check
        check_codes_fingerprint(streams, meta, cfg.codes, streamed=True)
    return dict(streams), meta


def _rows_to_ids(rows: dict, cfg: CodeDataConfig, split: str, meta: CodesMeta, layout: TokenLayout) -> torch.Tensor:
    codes = torch.from_numpy(np.asarray(rows["codes"], dtype=np.int64))  # (B, h, w)
    classes = None
    if layout.num_classes:
        classes = torch.from_numpy(np.asarray(rows["label"], dtype=np.int64))
    _check_codes(codes, classes, cfg, split, meta.codebook_size, meta.grid, layout.num_classes)
    return grid_to_input_ids(codes, layout, classes)  # (B, 2 + h*w)


class StreamingCodes(StreamBatches):
    """The train split of streamed codes, tokenised and checked batch by batch (see `StreamBatches`)."""

    def __init__(self, raw, cfg: CodeDataConfig, meta: CodesMeta, layout: TokenLayout, seed: int = 0):
        super().__init__(raw, seed, cfg.shuffle_buffer, f"code dataset {cfg.codes}")
        self.cfg, self.meta, self.layout = cfg, meta, layout

    def make_batch(self, rows: dict, worker: int, epoch: int, first_row: int) -> dict:
        return {"input_ids": _rows_to_ids(rows, self.cfg, "train", self.meta, self.layout)}


def streaming_code_splits(cfg: CodeDataConfig, splits, seed: int):
    streams, meta = open_code_streams(cfg)
    layout = TokenLayout.from_meta(meta, cfg.conditional)
    out = {}
    for split in splits:
        if split not in streams:
            raise VqgenError(f"code dataset {cfg.codes} has no {split!r} split (it has {sorted(streams)})")
        stream = streams[split].take(cfg.max_samples) if cfg.max_samples is not None else streams[split]
        if split == "train":
            out[split] = StreamingCodes(stream, cfg, meta, layout, seed)
            continue
        rows = list(stream.take(cfg.streaming_eval_rows))
        if not rows:
            raise VqgenError(f"code dataset {cfg.codes}: split {split!r} is empty")
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        out[split] = CodeSequences(_rows_to_ids(columns, cfg, split, meta, layout))
    return out, meta, layout

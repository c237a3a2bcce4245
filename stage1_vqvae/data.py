"""Stage 1's images as training data: splits held in memory, decoded on the fly or streamed, transforms and
augmentation (the sources themselves, and the held-out carve, are in `sources.py`).

Every source becomes a `datasets.DatasetDict` with train/validation/test splits; the image and label columns
are found by feature type (overridable). Images are decoded by this module (so a corrupt file is named),
converted to the configured mode, resized/cropped/padded with torchvision.transforms.v2 and kept as uint8;
`to_model_input` scales them to [-1, 1] on the training device.

Three ways to hold a split, chosen by `load_splits`:
- `ImageSplit`: decoded once into memory as uint8, when all requested splits fit `data.cache_max_gb` (MNIST:
  fast epochs on few cores);
- `LazyImageSplit`: rows stay in the memory-mapped Arrow table and are decoded in `__getitem__`, i.e. in the
  DataLoader workers, so memory does not grow with the dataset; resume stays exact (a map-style dataset
  under the seeded sampler);
- `StreamingImages` (`data.streaming=true`): a `datasets` streaming source (a Hub id, a folder of parquet,
  images or WebDataset .tar shards) read shard by shard; every rank reads its own shards, every worker its own
  part of them, and the position in the stream is checkpointed and restored.

Augmentation (`data.augment`, `data.hflip`, train split only) is drawn from a generator seeded by (seed, epoch,
row), so it changes every epoch, does not depend on the worker that decodes the row, and a resumed run sees the
same crops as an uninterrupted one.

Image modes: 16-bit and float images are rescaled to 8 bits; CMYK, palette and alpha images are converted
(alpha is composited onto black, the background of MNIST-like data); then L or RGB as configured.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from stage1_vqvae.data_config import DataConfig
from stage1_vqvae.sources import (
    _empty_split,
    find_columns,
    load_source,
    load_stream_source,
)
from vqgen.cli import VqgenError
from vqgen.config import from_dict, parse_overrides
from vqgen.streaming import StreamBatches

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Decoding and transforms


def to_mode(img: Image.Image, channels: str) -> Image.Image:
    """Any PIL mode -> 8-bit L or RGB (16-bit/float rescaled, alpha composited onto black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            top = 65535.0
        elif img.mode == "F" and arr.max() <= 1.0:
            top = 1.0  # float images in [0, 1]
        else:
            top = 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == channels:
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(channels)


COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")
GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")


def augment_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one row's augmentation in one epoch: a function of (seed, epoch, row) alone, so the
    draw does not depend on which worker decodes the row or on where a resumed run started."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 998_244_353 + index) % (2**63 - 1))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (), generator=gen))


# Bump when the decoding changes (resampling, padding, conversion): cached statistics of a split decoded on the fly,
# keyed by `LazyImageSplit.fingerprint`, are then never served.
TRANSFORM_VERSION = 1
# The DataConfig fields that change the pixels or labels a split decoded on the fly yields.
PIXEL_AND_LABEL_FIELDS = ("source", "resolution", "channels", "resize_mode", "image_column", "label_column")


class ImageTransform:
    """PIL image -> uint8 (C, R, R) tensor: mode, then resize + centre crop, pad or stretch; with a generator
    (the train split, when `augment`/`hflip` are set) a random crop and a random mirror instead."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.warned = False  # said once that colour becomes gray (or gray is repeated to RGB)
        r = cfg.resolution
        if cfg.resize_mode == "crop":
            ops = [v2.Resize(r, antialias=True), v2.CenterCrop(r)]
        elif cfg.resize_mode == "stretch":
            ops = [v2.Resize((r, r), antialias=True)]
        else:
            ops = []  # padding is done on the PIL image, below
        self.ops = v2.Compose([v2.PILToTensor(), *ops])

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        if cfg.channels == "L" and img.mode in COLOUR_MODES and not self.warned:
            logger.warning(
                "colour (%s) images are converted to grayscale because data.channels=L; set data.channels=RGB "
                "to keep the colour",
                img.mode,
            )
            self.warned = True
        if cfg.channels == "RGB" and img.mode in GRAY_MODES and not self.warned:
            logger.warning(
                "grayscale (%s) images are repeated to 3 channels because data.channels=RGB: the model learns three "
                "copies of one channel (and may tint its reconstructions); set data.channels=L for gray images",
                img.mode,
            )
            self.warned = True
        img = to_mode(img, cfg.channels)
        if gen is not None and cfg.augment != "none":
            out = _to_tensor(self._random_crop(img, gen))
        elif img.size == (cfg.resolution,) * 2:
            # Already the right size: skip the transform pipeline, whose per-call overhead dominates small images.
            out = _to_tensor(img)
        elif cfg.resize_mode == "pad":
            side = max(img.size)
            canvas = Image.new(img.mode, (side, side))
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            out = _to_tensor(canvas.resize((cfg.resolution,) * 2, Image.BILINEAR))
        else:
            out = self.ops(img)  # (C, R, R) uint8
        if gen is not None and cfg.hflip and torch.rand((), generator=gen).item() < 0.5:
            out = out.flip(-1)
        return out

    def _random_crop(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        r, (w, h) = self.cfg.resolution, img.size
        if self.cfg.augment == "random_crop":  # shorter side to R, then an R x R window anywhere along the longer
            scale = r / min(w, h)
            if scale != 1:
                img = img.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            x, y = _randint(gen, w - r), _randint(gen, h - r)
            return img.crop((x, y, x + r, y + r))
        # random_resized_crop: area fraction uniform in [crop_min_scale, 1], aspect ratio log-uniform in
        # [3/4, 4/3] (Szegedy et al. 2015, as torchvision draws it), 10 tries, then the centre square.
        for _ in range(10):
            target = w * h * _uniform(gen, self.cfg.crop_min_scale, 1.0)
            ratio = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = _randint(gen, w - cw), _randint(gen, h - ch)
                break
        else:
            cw = ch = min(w, h)
            x, y = (w - cw) // 2, (h - ch) // 2
        return img.resize((r, r), Image.BICUBIC, box=(x, y, x + cw, y + ch))  # PIL resizes antialiased


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.array(img)  # (H, W) or (H, W, 3) uint8, writable
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())  # (C, H, W)


def decode_image(value, where: str) -> Image.Image:
    """A datasets Image value (decode=False: {'bytes', 'path'}) -> PIL image, or one clear error."""
    if value is None:
        raise VqgenError(f"{where}: the image is missing (null); remove the row or fill it")
    if isinstance(value, Image.Image):  # a source that decodes itself (e.g. WebDataset's .jpg columns)
        return value
    src = value.get("path") or "bytes"
    try:
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        else:
            img = Image.open(value["path"])
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VqgenError(f"{where} ({src}): cannot decode the image ({e}). Remove or replace that file") from None


def check_labels(values: list, n_classes: int, split: str) -> torch.Tensor:
    bad = [v for v in values if v is None or not 0 <= v < n_classes]
    if bad:
        raise VqgenError(
            f"split {split!r}: label {bad[0]} is outside the {n_classes} class names; "
            "fix the label column or set data.label_column=none"
        )
    return torch.tensor(values, dtype=torch.long)


class _Split(torch.utils.data.Dataset):
    """What every map-style split shares: the epoch (for augmentation), class names, a few images to show."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, split: str, augment: bool, seed: int):
        self.cfg, self.split, self.seed, self.epoch = cfg, split, seed, 0
        self.augment = augment and (cfg.augment != "none" or cfg.hflip)
        self.image_column, self.label_column = find_columns(ds, cfg)
        self.class_names = ds.features[self.label_column].names if self.label_column else None

    def set_epoch(self, epoch: int) -> None:
        """Called through the prepared DataLoader's set_epoch; workers are started anew each epoch and copy it."""
        self.epoch = epoch

    def generator(self, i: int) -> torch.Generator | None:
        return augment_generator(self.seed, self.epoch, i) if self.augment else None

    def first_images(self, n: int) -> torch.Tensor:
        """The first n images, unaugmented: (n, C, R, R) uint8 (reconstruction grids)."""
        raise NotImplementedError


class ImageSplit(_Split):
    """One split as uint8 tensors, decoded once into memory (fast epochs on few cores). Augmentation: hflip
    only (a crop needs the full image, so `load_splits` never caches a split it crops)."""

    def __init__(
        self,
        ds: datasets.Dataset,
        cfg: DataConfig,
        split: str = "train",
        progress: bool = False,
        augment: bool = False,
        seed: int = 0,
    ):
        from tqdm.auto import tqdm

        super().__init__(ds, cfg, split, augment, seed)
        if self.augment and cfg.augment != "none":
            raise ValueError("ImageSplit holds decoded images and cannot crop them anew; use LazyImageSplit")
        # Decoded the one way every split is (LazyImageSplit's), a chunk at a time.
        rows = LazyImageSplit(ds, cfg, split)
        images, labels = [], []
        bar = tqdm(total=len(ds), desc=f"decoding {split}", disable=not progress, leave=False)
        for lo in range(0, len(ds), 1024):
            x, y = rows.decode_rows(range(lo, min(lo + 1024, len(ds))))
            images.append(x)
            labels.append(y)
            bar.update(len(x))
        bar.close()
        self.images = torch.cat(images)  # (N, C, R, R) uint8
        self.labels = torch.cat(labels)  # (N,), -1 when unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if self.augment and torch.rand((), generator=self.generator(int(i))).item() < 0.5:
            image = image.flip(-1)
        return {"images": image, "labels": self.labels[i]}

    def first_images(self, n: int) -> torch.Tensor:
        return self.images[:n]

    def fingerprint(self) -> str:
        """What identifies the split's images and labels (cache keys): their bytes."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


class LazyImageSplit(_Split):
    """One split decoded row by row in `__getitem__` (so in the DataLoader workers) from the memory-mapped Arrow
    table: memory stays flat whatever the dataset's size, and augmentation is drawn anew every epoch."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, split: str = "train", augment: bool = False, seed=0):
        super().__init__(ds, cfg, split, augment, seed)
        self.raw = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.n_classes = len(self.class_names) if self.class_names else 0
        self.transform = ImageTransform(cfg)

    def __len__(self) -> int:
        return len(self.raw)

    def fingerprint(self) -> str:
        """What identifies the split's images and labels (cache keys): the Arrow table's fingerprint, every config
        field that changes the decoded pixels or labels, read by name (a renamed field fails here instead of
        silently dropping out of the key: audit 3, S4-1), and the transform's version."""
        if not getattr(self.raw, "_fingerprint", None):
            raise VqgenError(f"cannot fingerprint split {self.split!r} to cache its features")
        key = {"arrow": self.raw._fingerprint, "split": self.split, "transform": TRANSFORM_VERSION}
        key.update({name: getattr(self.cfg, name) for name in PIXEL_AND_LABEL_FIELDS})
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def decode_rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in one Arrow read -> (uint8 (B, C, R, R) images, (B,) labels, -1 when unlabelled)."""
        indices = [int(i) for i in indices]
        rows = self.raw[indices]  # one columnar read
        images = torch.stack(
            [
                self.transform(decode_image(v, f"split {self.split!r} row {i}"), self.generator(i))
                for i, v in zip(indices, rows[self.image_column])
            ]
        )  # (B, C, R, R)
        if self.label_column:
            labels = check_labels(rows[self.label_column], self.n_classes, self.split)
        else:
            labels = torch.full((len(indices),), -1, dtype=torch.long)
        return images, labels

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of rows in one Arrow read (the DataLoader's fetcher calls this instead of __getitem__)."""
        images, labels = self.decode_rows(indices)
        return [{"images": x, "labels": y} for x, y in zip(images, labels)]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def first_images(self, n: int) -> torch.Tensor:
        saved, self.augment = self.augment, False
        try:
            return self.decode_rows(range(min(n, len(self))))[0]
        finally:
            self.augment = saved

    @staticmethod
    def default_workers(num_processes: int) -> int:
        """DataLoader workers for decoding on the fly: the cores each process has beyond its own, 1 to 4."""
        return min(4, max(1, (os.cpu_count() or 1) // num_processes - 1))


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) in [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def split_nbytes(n_rows: int, cfg: DataConfig) -> int:
    """Bytes of n decoded uint8 images at the configured size."""
    return n_rows * (1 if cfg.channels == "L" else 3) * cfg.resolution**2


def load_splits(
    cfg: DataConfig,
    splits=("train", "validation", "test"),
    progress: bool = False,
    *,
    augment_train: bool = False,
    seed: int = 0,
    in_memory: bool | None = None,
) -> dict:
    """{split: dataset of {'images': uint8 (C, R, R), 'labels'}} for `splits`.

    in_memory None (the default) caches the smallest splits first while their decoded bytes fit
    `data.cache_max_gb` together and decodes the rest on the fly (`LazyImageSplit`); True and False force one
    way. A train split that is cropped anew each epoch is never cached. `data.streaming` returns
    `streaming_splits` instead (train as `StreamingImages`).
    """
    if cfg.streaming:
        return streaming_splits(cfg, splits, augment_train=augment_train, seed=seed)
    dd = load_source(cfg)
    budget = cfg.cache_max_gb * 2**30
    used, out = 0, {}
    for s in sorted(splits, key=lambda s: len(dd[s])):
        augment = augment_train and s == "train"
        cache = in_memory
        if cache is None:
            crops = augment and cfg.augment != "none"
            cache = not crops and used + split_nbytes(len(dd[s]), cfg) <= budget
        if cache:
            used += split_nbytes(len(dd[s]), cfg)
            out[s] = ImageSplit(dd[s], cfg, s, progress=progress, augment=augment, seed=seed)
        else:
            out[s] = LazyImageSplit(dd[s], cfg, s, augment=augment, seed=seed)
    if not all(isinstance(v, ImageSplit) for v in out.values()):
        lazy = {
            k: f"{split_nbytes(len(dd[k]), cfg) / 2**30:.2f} GiB"
            for k, v in out.items()
            if isinstance(v, LazyImageSplit)
        }
        logger.info("decoding on the fly (over data.cache_max_gb=%s, or cropped anew): %s", cfg.cache_max_gb, lazy)
    return {s: out[s] for s in splits}


def streaming_splits(cfg: DataConfig, splits, *, augment_train: bool = False, seed: int = 0) -> dict:
    """train: `StreamingImages`; validation/test: their first `streaming_holdout` rows, decoded into memory."""
    streams, image_col, carved = load_stream_source(cfg)
    out = {}
    for s in splits:
        raw = streams[s]
        features = raw.features
        if s == "train":
            out[s] = StreamingImages(raw, cfg, features, augment=augment_train, seed=seed)
        else:
            rows = list(raw.take(cfg.streaming_holdout))
            if not rows:
                raise _empty_split(cfg, s, s in carved)
            held = datasets.Dataset.from_list(rows, features=features)
            out[s] = ImageSplit(held.cast_column(image_col, datasets.Image()), cfg, s)
    return out


class StreamingImages(StreamBatches):
    """The train split of a streamed image source (see `StreamBatches`): rows decoded and augmented in the
    DataLoader workers."""

    def __init__(self, raw, cfg: DataConfig, features, augment: bool = False, seed: int = 0):
        super().__init__(raw, seed, cfg.shuffle_buffer, cfg.source)
        self.cfg = cfg
        probe = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        self.image_column, self.label_column = find_columns(probe, cfg)
        self.class_names = features[self.label_column].names if self.label_column else None
        self.augment = augment and (cfg.augment != "none" or cfg.hflip)
        self.transform = None

    def make_batch(self, rows: dict, worker: int, epoch: int, first_row: int) -> dict:
        if self.transform is None:  # built in the worker
            self.transform = ImageTransform(self.cfg)
        where = f"streamed split 'train' (rank {self.rank}, worker {worker}, epoch {epoch})"
        images = []
        for j, value in enumerate(rows[self.image_column]):
            gen = None
            if self.augment:  # no stable row index in a stream: (rank, worker, rows made) stands in
                gen = augment_generator(self.seed, epoch, ((self.rank * 1024 + worker) << 40) + first_row + j)
            images.append(self.transform(decode_image(value, where), gen))
        if self.label_column:
            labels = check_labels(rows[self.label_column], len(self.class_names), "train")
        else:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        return {"images": torch.stack(images), "labels": labels}


def data_config_for(saved: dict | None, overrides: list[str]) -> DataConfig:
    """A model's saved data config with `data.key=value` overrides, for evaluation and extraction (on the model's
    images or others). Both read every row of a split, so a source the model streamed is read map-style: the
    held-out carve is the same in both modes (`holdout_place`), so the rows scored are those the stream held out."""
    over = parse_overrides(overrides)
    unknown = sorted(set(over) - {"data"})
    if unknown:
        raise VqgenError(f"only data.* keys may be overridden here, got {unknown} (e.g. data.source=FOLDER)")
    merged = {**(saved or {}), **over.get("data", {})}
    if "source" in merged and merged["source"] is None:  # an imported tokenizer: no training images of its own
        raise VqgenError("this model records no image source (an imported tokenizer): pass data.source=FOLDER_OR_ID")
    cfg = from_dict(DataConfig, merged, "data")
    if cfg.streaming:
        logger.info(
            "data.source %s is read map-style here (every row of each split); the carve is the stream's", cfg.source
        )
        cfg.streaming = False
    return cfg

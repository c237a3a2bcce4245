"""Stage 1's data config: where the images come from and how they are prepared (`data.*` in the YAML configs, and
`data_config.json` beside a trained model). Its own file so that `sources.py` (which reads sources) and `data.py`
(which builds splits and streams from them) both import it and neither imports the other back; `data.py`
re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vqgen.config import option


@dataclass
class DataConfig:
    source: str = option("mnist", '"mnist" (built in, offline), a Hub dataset id, or a local folder')
    image_column: str | None = option(None, "default: the first column of feature type Image")
    label_column: str | None = option(None, 'default: the first ClassLabel column; "none" to ignore labels')
    resolution: int = option(28, "square side fed to the model")
    channels: Literal["L", "RGB"] = "L"
    resize_mode: Literal["crop", "pad", "stretch"] = option("crop", "crop: centre crop; pad: letterbox onto black")
    train_split: str = "train"
    validation_split: str = option("validation", "carved from train when the source has none (see holdout_place)")
    test_split: str = option("test", "carved from train when the source has none (see holdout_place)")
    validation_fraction: float = option(
        0.05, "of train, when validation is carved (each image by a hash of its pixels)"
    )
    test_fraction: float = option(0.05, "of train, when test is carved (each image by a hash of its pixels)")
    max_samples: int | None = option(None, "cap on every split (quick runs and tests)")
    cache_dir: str | None = option(None, "where the built-in MNIST is converted; default ~/.cache/vqgen")
    cache_max_gb: float = option(0.25, "decoded splits held in memory while they fit this (GiB, all splits together)")
    streaming: bool = option(False, "read the source as a datasets stream (Hub id, parquet/image/.tar folder)")
    shuffle_buffer: int = option(10000, "streaming: rows in the shuffle buffer (shards are shuffled too)")
    streaming_holdout: int = option(1000, "streaming: rows of the validation split held in memory to validate on")
    augment: Literal["none", "random_crop", "random_resized_crop"] = option("none", "train split only")
    crop_min_scale: float = option(0.5, "random_resized_crop: smallest fraction of the image area kept")
    hflip: bool = option(False, "train split only: mirror half the images")

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if not 0 < self.validation_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("validation_fraction and test_fraction must be in (0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave some of train to train on (< 1)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")
        if self.cache_max_gb < 0:
            raise ValueError(f"cache_max_gb must be >= 0 (0 never caches), got {self.cache_max_gb}")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if self.shuffle_buffer < 1 or self.streaming_holdout < 1:
            raise ValueError("shuffle_buffer and streaming_holdout must be positive")
        if self.augment != "none" and self.resize_mode == "pad":
            raise ValueError("augment crops the image; it cannot be combined with resize_mode pad")
